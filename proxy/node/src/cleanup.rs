//! `iamlet cleanup [--kube2iam]`: removes everything iamlet installed — the IAMLET chain and
//! every jump to it, IPv4 and IPv6, in every installed backend — in one atomic restore per
//! table. With `--kube2iam`, also kube2iam's PREROUTING DNAT rules to the metadata address
//! (kube2iam's manual fix: `iptables -t nat -S PREROUTING | grep 169.254.169.254` + `-D`).
//! Idempotent: nothing to remove is success.

use super::backend::{Backend, Tool};
use super::redirect::restore;
use super::rules::{self, Family, NatView};
use super::{METADATA_V4, METADATA_V6, cmd};
use std::net::IpAddr;

/// Removes iamlet's chain and jumps (and kube2iam's rules for `kube2iam` addresses) from one
/// backend's nat table of `family`. Ok(None): there was nothing.
pub fn remove_from(
    backend: Backend,
    family: Family,
    kube2iam: Option<&[IpAddr]>,
) -> Result<Option<String>, super::cmd::CommandError> {
    let view = backend.nat(family)?;
    let Some(script) = rules::removal_script(&view, kube2iam) else {
        return Ok(None);
    };
    restore(backend, family, &script)?;
    Ok(Some(describe(&view, kube2iam)))
}

fn describe(view: &NatView, kube2iam: Option<&[IpAddr]>) -> String {
    let mut parts = Vec::new();
    if view.chains.contains(rules::CHAIN) {
        parts.push(format!(
            "chain {} ({} rule(s))",
            rules::CHAIN,
            view.chain_rules(rules::CHAIN).count()
        ));
    }
    let jumps = view.jumps().count();
    if jumps > 0 {
        parts.push(format!("{jumps} jump(s) to {}", rules::CHAIN));
    }
    if let Some(addrs) = kube2iam {
        let n = rules::kube2iam_rules(view, addrs).len();
        if n > 0 {
            parts.push(format!("{n} kube2iam DNAT rule(s)"));
        }
    }
    parts.join(", ")
}

/// The addresses kube2iam's rules point at: 169.254.169.254 and a literal IPv4
/// `--metadata-addr` host if different.
pub fn kube2iam_addrs(metadata_hostport: &str) -> Vec<IpAddr> {
    let mut v = vec![IpAddr::V4(METADATA_V4)];
    let host = metadata_hostport
        .rsplit_once(':')
        .map_or(metadata_hostport, |(h, _)| h);
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>()
        && !ip.is_loopback()
        && !v.contains(&IpAddr::V4(ip))
    {
        v.push(IpAddr::V4(ip));
    }
    v
}

/// `cleanup --kube2iam-only`: removes kube2iam's leftover rules and nothing of iamlet's, so
/// it is safe on a node where iamlet is serving.
fn run_kube2iam_only(backends: Vec<Backend>, addrs: &[IpAddr]) -> i32 {
    let mut removed = 0;
    for b in backends {
        if !b.installed(Family::V4) {
            continue;
        }
        let view = match b.nat(Family::V4) {
            Ok(v) => v,
            Err(e) => {
                println!("cannot read the nat table (ipv4, {b}): {e}");
                return 1;
            }
        };
        let Some(script) = rules::kube2iam_only_script(&view, addrs) else {
            continue;
        };
        let n = rules::kube2iam_rules(&view, addrs).len();
        if let Err(e) = restore(b, Family::V4, &script) {
            println!(
                "cannot remove kube2iam's rules (ipv4, {b}): {e}; run it as root with NET_ADMIN"
            );
            return 1;
        }
        removed += n;
        println!(
            "removed {n} kube2iam DNAT rule(s) from nat PREROUTING (ipv4, {b}); iamlet's rules untouched"
        );
    }
    if removed == 0 {
        println!("nothing to remove: no kube2iam rules on this node");
    } else {
        flush_conntrack();
    }
    0
}

/// The `cleanup` subcommand; prints one line per change and returns the exit code.
pub fn run(kube2iam: bool, kube2iam_only: bool, metadata_hostport: &str) -> i32 {
    let backends = Backend::available();
    if backends.is_empty() {
        println!(
            "iamlet cleanup: no iptables tools (iptables, iptables-save, iptables-restore) found on PATH or in /usr/sbin; run it where they are installed (the iamlet image has them)."
        );
        return 1;
    }
    let addrs = kube2iam_addrs(metadata_hostport);
    if kube2iam_only {
        return run_kube2iam_only(backends, &addrs);
    }
    let mut removed = 0;
    let mut failed = 0;
    let mut leftovers = 0;
    for b in backends {
        for f in Family::ALL {
            if !b.installed(f) {
                continue;
            }
            let k2i = (kube2iam && f == Family::V4).then_some(&addrs[..]);
            if !kube2iam
                && f == Family::V4
                && let Ok(view) = b.nat(f)
            {
                let n = rules::kube2iam_rules(&view, &addrs).len();
                if n > 0 {
                    leftovers += n;
                    println!(
                        "found {n} kube2iam DNAT rule(s) to the metadata address in nat PREROUTING ({f}, {b}); run `iamlet cleanup --kube2iam` to remove them"
                    );
                }
            }
            match remove_from(b, f, k2i) {
                Ok(Some(what)) => {
                    removed += 1;
                    println!("removed {what} from the nat table ({f}, {b})");
                }
                Ok(None) => {}
                Err(e) => {
                    failed += 1;
                    println!("cannot clean the nat table ({f}, {b}): {e}");
                }
            }
        }
    }
    if removed > 0 {
        flush_conntrack();
    }
    if failed > 0 {
        println!(
            "iamlet cleanup: {failed} table(s) could not be cleaned; run it as root with NET_ADMIN (privileged: true)"
        );
        return 1;
    }
    if removed == 0 {
        if leftovers > 0 {
            println!("nothing of iamlet's to remove");
        } else {
            println!("nothing to remove: no iamlet rules on this node");
        }
    }
    0
}

/// Cuts redirected connections so pods reconnect along the path that now applies.
fn flush_conntrack() {
    for (addr, fam) in [
        (IpAddr::V4(METADATA_V4), None),
        (IpAddr::V6(METADATA_V6), Some("ipv6")),
        (IpAddr::V4(super::CONTAINER_V4), None),
        (IpAddr::V6(super::CONTAINER_V6), Some("ipv6")),
    ] {
        let a = addr.to_string();
        let mut args = vec!["-D", "-p", "tcp", "--orig-dst", &a];
        if let Some(f) = fam {
            args.extend(["-f", f]);
        }
        let _ = cmd::run("conntrack", &args, None);
    }
}

/// Every backend and family holding anything of iamlet's (for `doctor`).
pub fn inventory() -> Vec<(Backend, Family, NatView)> {
    let mut v = Vec::new();
    for b in Backend::available() {
        for f in Family::ALL {
            if b.installed(f)
                && cmd::which(&b.tool(f, Tool::Save)).is_some()
                && let Ok(view) = b.nat(f)
            {
                v.push((b, f, view));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube2iam_addresses() {
        assert_eq!(
            kube2iam_addrs("169.254.169.254:80"),
            [IpAddr::V4(METADATA_V4)]
        );
        assert_eq!(kube2iam_addrs("127.0.0.1:1338"), [IpAddr::V4(METADATA_V4)]);
        assert_eq!(
            kube2iam_addrs("10.1.2.3:80"),
            [
                IpAddr::V4(METADATA_V4),
                "10.1.2.3".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(kube2iam_addrs("imds.local:80"), [IpAddr::V4(METADATA_V4)]);
    }
}
