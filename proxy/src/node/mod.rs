//! Node integration: the nat redirect of pods' metadata traffic to iamlet (`--iptables`),
//! its removal (`iamlet cleanup`), the node checks (`iamlet doctor`), pod-interface detection
//! (`--host-interface auto`) and who holds a port. Everything that touches the node's
//! network configuration lives here; `main.rs` only calls in.

pub mod backend;
pub mod cleanup;
pub mod cmd;
pub mod doctor;
pub mod iface;
pub mod metrics;
pub mod port;
pub mod redirect;
pub mod rules;

pub use metrics::NodeMetrics;
pub use redirect::Redirect;

use crate::args::{Args, Command, NodeArgs};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// The instance metadata service's IPv4 address, as pods use it.
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The IPv6 one (Nitro instances).
pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Checks the node flags' syntax (no node state); one sentence with the fix on error.
pub fn validate(node: &NodeArgs, host_ip: Option<IpAddr>) -> Result<(), String> {
    iface::validate_values(&node.host_interface)?;
    if node.iptables_verify_interval.is_zero() {
        return Err(
            "--iptables-verify-interval must be greater than 0; use e.g. 10s (how often the rule is checked and restored).".into(),
        );
    }
    if node.iptables && node.app_port == 0 {
        return Err(
            "--app-port=0 picks a random port, which the iptables rule cannot point at; give --iptables a fixed --app-port (e.g. 8181).".into(),
        );
    }
    if node.iptables && host_ip.is_some_and(|ip| ip.is_ipv6()) {
        return Err(
            "--host-ip must be the node's IPv4 address for the iptables rule; give the IPv6 one with --host-ipv6 (and --ipv6).".into(),
        );
    }
    if let Some(h) = node.host_ipv6.as_deref().filter(|h| !h.is_empty()) {
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "--host-ipv6 {h:?} is not an IPv6 address; pass the node's IPv6 address (status.hostIPs) or omit it to REDIRECT to --app-port."
            ));
        }
        if !node.ipv6 {
            return Err(
                "--host-ipv6 is only used with --ipv6; add --ipv6 or drop --host-ipv6.".into(),
            );
        }
    }
    Ok(())
}

/// For `main`, before binding: with `--iptables`, resolves the interfaces and the backend
/// (a wrong `--host-interface` fails here, in one sentence). `ready` is set once installed.
pub fn prepare(
    node: &NodeArgs,
    host_ip: Option<IpAddr>,
    ready: Arc<AtomicBool>,
) -> Result<Option<Arc<Redirect>>, String> {
    if !node.iptables {
        return Ok(None);
    }
    let host_ip = host_ip.ok_or("--iptables needs --host-ip to know where to redirect metadata traffic; add --host-ip=$(HOST_IP) (status.hostIP from the Downward API).")?;
    Redirect::prepare(node, host_ip, NodeMetrics::default(), ready).map(|r| Some(Arc::new(r)))
}

/// For `main`, once the listeners are bound and the pods are known: installs the redirect
/// and starts re-verifying it every `interval`.
pub fn start(redirect: &Arc<Redirect>, interval: Duration) -> Result<(), String> {
    redirect.install()?;
    redirect
        .spawn_verifier(interval)
        .map_err(|e| format!("cannot start the iptables verifier thread: {e}"))?;
    Ok(())
}

/// Runs a subcommand and returns the process exit code.
pub fn run_command(cmd: &Command, args: &Args) -> i32 {
    match cmd {
        Command::Cleanup(c) => {
            let hostport = crate::config::metadata_hostport(&args.node.metadata_addr)
                .unwrap_or_else(|_| "169.254.169.254:80".into());
            cleanup::run(c.kube2iam, c.kube2iam_only, &hostport)
        }
        Command::Doctor(d) => doctor::run(args, d),
    }
}

/// `count` SO_REUSEPORT listeners on `[::]:port`, IPv6 only (the IPv4 listeners serve IPv4),
/// non-blocking as monoio's epoll driver needs; for `--ipv6`.
pub fn bind_v6(port: u16, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let one = |port: u16| -> std::io::Result<std::net::TcpListener> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(true)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    let first = one(port)?;
    let bound = first.local_addr()?.port();
    let mut all = vec![first];
    for _ in 1..count.max(1) {
        all.push(one(bound)?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn node(args: &[&str]) -> NodeArgs {
        Args::try_parse_from(std::iter::once("iamlet").chain(args.iter().copied()))
            .unwrap()
            .node
    }

    #[test]
    fn node_flags_parse_with_kube2iam_defaults() {
        let n = node(&[]);
        assert_eq!(n.host_interface, ["docker0"]);
        assert_eq!(n.iptables_verify_interval, Duration::from_secs(10));
        assert!(!n.iptables_remove_on_exit && !n.ipv6);
        let n = node(&[
            "--host-interface=cali+,!eth0",
            "--host-interface",
            "weave",
            "--iptables-verify-interval=500ms",
            "--iptables-remove-on-exit",
            "--iptables-backend=legacy",
            "--ipv6",
            "--host-ipv6=fd00::1",
        ]);
        assert_eq!(n.host_interface, ["cali+", "!eth0", "weave"]);
        assert_eq!(n.iptables_verify_interval, Duration::from_millis(500));
        assert!(n.iptables_remove_on_exit && n.ipv6);
        assert_eq!(n.iptables_backend, crate::args::IptablesBackend::Legacy);
    }

    #[test]
    fn subcommands_parse_after_the_agent_flags() {
        let a = Args::try_parse_from(["iamlet", "--app-port=9", "cleanup", "--kube2iam"]).unwrap();
        assert!(matches!(a.command, Some(Command::Cleanup(c)) if c.kube2iam));
        assert_eq!(a.node.app_port, 9);
        let a = Args::try_parse_from(["iamlet", "doctor", "--test-role=r"]).unwrap();
        assert!(
            matches!(a.command, Some(Command::Doctor(d)) if d.test_role.as_deref() == Some("r"))
        );
        assert!(Args::try_parse_from(["iamlet"]).unwrap().command.is_none());
    }

    #[test]
    fn node_validations_are_one_sentence() {
        let v4: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        let v6: Option<IpAddr> = Some("fd00::1".parse().unwrap());
        let cases: &[(&[&str], Option<IpAddr>, &str)] = &[
            (&["--host-interface="], v4, "--host-interface is empty"),
            (&["--host-interface=!a,!b"], v4, "at most one !negated"),
            (
                &["--iptables-verify-interval=0s"],
                v4,
                "--iptables-verify-interval",
            ),
            (
                &["--iptables"],
                v6,
                "--host-ip must be the node's IPv4 address",
            ),
            (
                &["--host-ipv6=10.0.0.1", "--ipv6"],
                v4,
                "--host-ipv6 \"10.0.0.1\"",
            ),
            (&["--host-ipv6=fd00::1"], v4, "only used with --ipv6"),
            (&["--iptables", "--app-port=0"], v4, "--app-port=0"),
        ];
        for (args, ip, want) in cases {
            let e = validate(&node(args), *ip).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(e.ends_with('.') && !e.contains('\n'), "{e}");
        }
        assert_eq!(
            validate(&node(&["--iptables", "--host-interface=auto"]), v4),
            Ok(())
        );
    }
}
