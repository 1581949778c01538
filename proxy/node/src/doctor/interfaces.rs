//! Interfaces: the `--host-interface` values resolve, and the matched ones have received
//! packets.

use super::Check;
use crate::iface;
use crate::rules::IfaceMatch;

/// Interfaces: the values resolve, and the matched ones have received packets.
pub fn check(
    host_interface: &[String],
    iptables: bool,
    emit: &mut impl FnMut(Check),
) -> Option<Vec<IfaceMatch>> {
    const N: &str = "interfaces";
    let existing = match iface::existing() {
        Ok(e) => e,
        Err(e) => {
            emit(Check::fail(
                N,
                format!("cannot list network interfaces: {e}"),
            ));
            return None;
        }
    };
    if !iptables {
        emit(Check::ok(
            N,
            format!(
                "--host-interface is only used with --iptables ({})",
                hint(&existing)
            ),
        ));
        return None;
    }
    let (matches, auto) = match iface::resolve(host_interface, &existing) {
        Ok(r) => r,
        Err(e) => {
            emit(Check::fail(N, e.to_string()));
            return None;
        }
    };
    let rx = iface::rx_packets();
    let mut parts = Vec::new();
    let mut idle = Vec::new();
    for m in &matches {
        let hit: Vec<&String> = existing.iter().filter(|e| m.matches(e)).collect();
        if hit.is_empty() {
            emit(Check::warn(
                N,
                format!(
                    "--host-interface {m} matches no interface yet (no pods on this node yet, or not this CNI's prefix; {})",
                    hint(&existing)
                ),
            ));
            continue;
        }
        let packets: u64 = rx
            .iter()
            .filter(|(n, _)| m.matches(n))
            .map(|(_, p)| p)
            .sum();
        if packets == 0 {
            idle.push(m.to_string());
        }
        let shown: Vec<&str> = hit.iter().take(4).map(|s| s.as_str()).collect();
        let more = if hit.len() > 4 {
            format!(" and {} more", hit.len() - 4)
        } else {
            String::new()
        };
        parts.push(format!(
            "{m} matches {}{more} ({packets} packets received)",
            shown.join(", ")
        ));
    }
    let chose = if auto.is_empty() {
        String::new()
    } else {
        format!("auto chose {}; ", auto.join(", "))
    };
    if !idle.is_empty() {
        emit(Check::warn(
            N,
            format!(
                "{chose}{} received no packets yet: is that the pods' interface? ({})",
                idle.join(", "),
                hint(&existing)
            ),
        ));
    } else if !parts.is_empty() {
        emit(Check::ok(N, format!("{chose}{}", parts.join("; "))));
    }
    Some(matches)
}

pub(super) fn hint(existing: &[String]) -> String {
    let h = iface::hints(existing);
    if h.is_empty() {
        "no known CNI's pod interfaces here".into()
    } else {
        h.iter()
            .map(|c| format!("{} suggests --host-interface={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
