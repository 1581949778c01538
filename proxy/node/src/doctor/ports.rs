//! The app and metrics ports: free, or held by iamlet.

use super::Check;
use crate::{cleanup, port, rules};

/// The app and metrics ports: free, or held by iamlet.
pub fn check(app_port: u16, metrics_port: u16, iptables: bool, emit: &mut impl FnMut(Check)) {
    const N: &str = "port";
    let mut ports = vec![(app_port, "--app-port")];
    if metrics_port != app_port {
        ports.push((metrics_port, "--metrics-port"));
    }
    let redirected = iptables
        && cleanup::inventory()
            .iter()
            .any(|(_, _, v)| v.chain_rules(rules::CHAIN).next().is_some());
    for (p, flag) in ports {
        if p == 0 {
            continue;
        }
        let inodes = port::listeners(p);
        if inodes.is_empty() {
            if redirected && flag == "--app-port" {
                emit(Check::fail(
                    N,
                    format!(
                        "nothing listens on port {p} ({flag}) but the iptables rule sends pods there, so their metadata requests are refused (fail-closed); start iamlet, or run `iamlet cleanup` to let pods reach the node's metadata service"
                    ),
                ));
            } else {
                emit(Check::ok(N, format!("port {p} ({flag}) is free")));
            }
            continue;
        }
        let holders = port::holders(&inodes);
        if holders.is_empty() {
            emit(Check::warn(
                N,
                format!(
                    "port {p} ({flag}) is in use by a process not visible from here (another container?); if it is not iamlet: {}",
                    port::in_use_sentence(p, flag, &[])
                ),
            ));
        } else if holders.iter().all(|h| h.name == "iamlet") {
            let who: Vec<String> = holders.iter().map(ToString::to_string).collect();
            emit(Check::ok(
                N,
                format!("port {p} ({flag}) is served by {}", who.join(", ")),
            ));
        } else {
            emit(Check::fail(N, port::in_use_sentence(p, flag, &holders)));
        }
    }
}
