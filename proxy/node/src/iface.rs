//! `--host-interface`: parsing the values (`name`, `name+`, `!name`, `auto`), checking them
//! against the interfaces that exist, detecting the CNI's pod interfaces, and the one-sentence
//! error for a name that does not exist (kube2iam's `route ip+net: no such network interface`).

use super::rules::IfaceMatch;
use thiserror::Error;

/// Linux interface names are at most 15 bytes (IFNAMSIZ − 1).
const IFNAMSIZ: usize = 15;

/// A pod interface naming convention and the CNI it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cni {
    /// Interface name (exact) or prefix (when `prefix`).
    pub pattern: &'static str,
    pub prefix: bool,
    /// The `--host-interface` value that covers it.
    pub value: &'static str,
    pub name: &'static str,
    /// Chosen by `auto` (false: only a hint, e.g. flannel's VXLAN device carries no pods).
    pub pods: bool,
}

const fn cni(pattern: &'static str, prefix: bool, value: &'static str, name: &'static str) -> Cni {
    Cni {
        pattern,
        prefix,
        value,
        name,
        pods: true,
    }
}

/// Known pod interfaces, most specific first. docker0 comes last: it exists on many nodes
/// whatever the CNI and is chosen by `auto` only when nothing else is there.
pub const KNOWN: &[Cni] = &[
    cni("cali", true, "cali+", "Calico"),
    cni("eni", true, "eni+", "the AWS VPC CNI"),
    cni(
        "vlan",
        true,
        "vlan+",
        "the AWS VPC CNI with security groups for pods",
    ),
    cni("lxc", true, "lxc+", "Cilium"),
    cni("gke", true, "gke+", "GKE's CNI"),
    cni("weave", false, "weave", "Weave Net"),
    cni("cni0", false, "cni0", "flannel or the bridge plugin"),
    cni("cbr0", false, "cbr0", "kubenet"),
    cni("kube-bridge", false, "kube-bridge", "kube-router"),
    cni("tun0", false, "tun0", "OpenShift SDN"),
    Cni {
        pattern: "flannel",
        prefix: true,
        value: "cni0",
        name: "flannel (pods sit on cni0)",
        pods: false,
    },
    cni("docker0", false, "docker0", "Docker without a CNI"),
];

impl Cni {
    fn matches(&self, iface: &str) -> bool {
        if self.prefix {
            iface.starts_with(self.pattern) && iface != "lxc_health"
        } else {
            iface == self.pattern
        }
    }
}

/// The CNI conventions the given interfaces follow, in [`KNOWN`] order.
pub fn hints<'a>(ifaces: &[String]) -> Vec<&'a Cni> {
    KNOWN
        .iter()
        .filter(|c| ifaces.iter().any(|i| c.matches(i)))
        .collect()
}

/// What `auto` chooses: every known pod-interface convention present (docker0 only when it
/// is the only one). Empty when none is found.
pub fn detect(ifaces: &[String]) -> Vec<&'static Cni> {
    let found: Vec<&Cni> = KNOWN
        .iter()
        .filter(|c| c.pods && ifaces.iter().any(|i| c.matches(i)))
        .collect();
    if found.iter().any(|c| c.pattern != "docker0") {
        found
            .into_iter()
            .filter(|c| c.pattern != "docker0")
            .collect()
    } else {
        found
    }
}

/// A `--host-interface` value that is wrong, or that does not fit this node.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IfaceError {
    #[error(
        "--host-interface is empty; name the pods' interface (e.g. cali+, eni+, weave, cni0) or use --host-interface=auto."
    )]
    Empty,
    #[error(
        "--host-interface value {0:?} is not an interface name; use a name (weave), a prefix with a trailing + (cali+), a negation (!eth0) or auto."
    )]
    NotAName(String),
    #[error(
        "--host-interface takes at most one !negated value (each value is its own rule, so !a,!b would match every interface); name the pods' interfaces instead."
    )]
    TwoNegations,
    #[error("--host-interface=auto found no known pod interface on this node (interfaces here: {}); name the pods' interface with --host-interface.", list(.existing))]
    AutoFoundNone { existing: Vec<String> },
    #[error("{}", missing_sentence(.name, .existing))]
    Missing { name: String, existing: Vec<String> },
}

/// Checks the syntax of `--host-interface` values (no node state).
pub fn validate_values(values: &[String]) -> Result<(), IfaceError> {
    if values.is_empty() || values.iter().all(|v| v.trim().is_empty()) {
        return Err(IfaceError::Empty);
    }
    let mut negated = 0;
    for v in values.iter().map(|v| v.trim()) {
        if v == "auto" {
            continue;
        }
        let m = IfaceMatch::parse(v);
        negated += usize::from(m.negated);
        let bad_char = m.name.char_indices().any(|(i, c)| {
            c.is_whitespace() || c == '/' || c == '!' || (c == '+' && i + 1 != m.name.len())
        });
        if m.name.is_empty() || m.name == "+" && !m.negated || bad_char || m.name.len() > IFNAMSIZ {
            return Err(IfaceError::NotAName(v.to_owned()));
        }
    }
    if negated > 1 {
        return Err(IfaceError::TwoNegations);
    }
    Ok(())
}

/// Turns `--host-interface` values into rule matches given the interfaces that exist:
/// `auto` becomes the detected CNI's values; a plain name (negated or not) must exist.
/// Returns the matches and what `auto` chose (for the log).
pub fn resolve(
    values: &[String],
    existing: &[String],
) -> Result<(Vec<IfaceMatch>, Vec<String>), IfaceError> {
    let mut out: Vec<IfaceMatch> = Vec::new();
    let mut chosen = Vec::new();
    for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        if v == "auto" {
            let found = detect(existing);
            if found.is_empty() {
                return Err(IfaceError::AutoFoundNone {
                    existing: existing.to_vec(),
                });
            }
            for c in found {
                chosen.push(format!("{} ({})", c.value, c.name));
                push_unique(&mut out, IfaceMatch::parse(c.value));
            }
            continue;
        }
        let m = IfaceMatch::parse(v);
        if !m.is_wildcard() && !existing.contains(&m.name) {
            return Err(IfaceError::Missing {
                name: m.name,
                existing: existing.to_vec(),
            });
        }
        push_unique(&mut out, m);
    }
    Ok((out, chosen))
}

fn push_unique(out: &mut Vec<IfaceMatch>, m: IfaceMatch) {
    if !out.contains(&m) {
        out.push(m);
    }
}

/// `--host-interface "weave" does not exist on this node (interfaces here: cali1, eth0, lo;
/// cali* suggests Calico: --host-interface=cali+); ...`
pub fn missing_sentence(name: &str, existing: &[String]) -> String {
    let h = hints(existing);
    let suggestion = if h.is_empty() {
        "none looks like a known CNI's pod interface".to_owned()
    } else {
        h.iter()
            .map(|c| {
                let shown = if c.prefix {
                    format!("{}*", c.pattern)
                } else {
                    c.pattern.to_owned()
                };
                format!("{shown} suggests {}: --host-interface={}", c.name, c.value)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "--host-interface {name:?} does not exist on this node (interfaces here: {}; {suggestion}); use the pods' interface or --host-interface=auto.",
        list(existing)
    )
}

fn list(existing: &[String]) -> String {
    const MAX: usize = 12;
    if existing.is_empty() {
        return "none".into();
    }
    let mut s = existing
        .iter()
        .take(MAX)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if existing.len() > MAX {
        s.push_str(&format!(", and {} more", existing.len() - MAX));
    }
    s
}

/// The interfaces in this network namespace (netlink, not /sys, so it is right whichever
/// mount namespace the process sees), sorted.
pub fn existing() -> std::io::Result<Vec<String>> {
    let mut v: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(std::io::Error::from)?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Received packets per interface from /proc/net/dev (this network namespace).
pub fn rx_packets() -> Vec<(String, u64)> {
    std::fs::read_to_string("/proc/net/dev")
        .map(|t| parse_net_dev(&t))
        .unwrap_or_default()
}

/// Parses /proc/net/dev: `  name: rx_bytes rx_packets ...`.
pub fn parse_net_dev(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let packets = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((name.trim().to_owned(), packets))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn auto_detects_the_cni() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["lo", "eth0", "cali12ab", "cali34cd", "tunl0"], &["cali+"]),
            (
                &["lo", "eth0", "eth1", "eni1a2b", "vlan7f"],
                &["eni+", "vlan+"],
            ),
            (
                &["lo", "eth0", "lxc1234", "lxc_health", "cilium_host"],
                &["lxc+"],
            ),
            (&["lo", "eth0", "cni0", "flannel.1", "veth1"], &["cni0"]),
            (&["lo", "eth0", "weave", "docker0"], &["weave"]),
            (&["lo", "eth0", "docker0"], &["docker0"]),
            (&["lo", "eth0", "cbr0"], &["cbr0"]),
            (&["lo", "eth0", "kube-bridge"], &["kube-bridge"]),
            (&["lo", "eth0", "flannel.1"], &[]),
            (&["lo", "eth0", "lxc_health"], &[]),
        ];
        for (ifaces, want) in cases {
            let got: Vec<&str> = detect(&names(ifaces)).iter().map(|c| c.value).collect();
            assert_eq!(&got, want, "{ifaces:?}");
        }
    }

    #[test]
    fn resolve_values_against_the_node() {
        let node = names(&["lo", "eth0", "cali1", "cali2"]);
        let ok = |v: &[&str]| {
            resolve(&names(v), &node)
                .map(|(m, _)| m.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(ok(&["cali+"]).unwrap(), ["cali+"]);
        assert_eq!(ok(&["auto"]).unwrap(), ["cali+"]);
        assert_eq!(
            ok(&["cali1", "cali2", "cali1"]).unwrap(),
            ["cali1", "cali2"]
        );
        assert_eq!(ok(&["!eth0"]).unwrap(), ["!eth0"]);
        // A wildcard that matches nothing yet is fine: pods come later.
        assert_eq!(ok(&["eni+"]).unwrap(), ["eni+"]);
        let e = ok(&["weave"]).unwrap_err().to_string();
        assert_eq!(
            e,
            "--host-interface \"weave\" does not exist on this node (interfaces here: lo, eth0, cali1, cali2; cali* suggests Calico: --host-interface=cali+); use the pods' interface or --host-interface=auto."
        );
        assert!(
            ok(&["!weave"])
                .unwrap_err()
                .to_string()
                .contains("\"weave\" does not exist")
        );
        let e = resolve(&names(&["auto"]), &names(&["lo", "eth0"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("found no known pod interface") && e.contains("lo, eth0"),
            "{e}"
        );
        let e = missing_sentence("docker0", &names(&["lo"]));
        assert!(
            e.contains("none looks like a known CNI's pod interface"),
            "{e}"
        );
    }

    #[test]
    fn value_syntax() {
        for good in [
            &["docker0"][..],
            &["cali+", "!eth0"],
            &["auto"],
            &["eni+", "vlan+"],
        ] {
            assert_eq!(validate_values(&names(good)), Ok(()), "{good:?}");
        }
        for bad in [
            &[""][..],
            &["ca+li"],
            &["!"],
            &["a b"],
            &["averyveryverylongname0"],
            &["!a", "!b"],
            &["!!a"],
        ] {
            let e = validate_values(&names(bad)).unwrap_err().to_string();
            assert!(
                e.starts_with("--host-interface") && e.ends_with('.') && !e.contains('\n'),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn long_lists_are_shortened() {
        let many: Vec<String> = (0..20).map(|i| format!("cali{i}")).collect();
        let s = list(&many);
        assert!(s.ends_with("cali11, and 8 more"), "{s}");
    }

    #[test]
    fn net_dev_parsing() {
        let t = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    lo:     100       2    0    0    0     0          0         0      100\n cali1:   5000      42    0    0    0     0          0         0     3000\n";
        assert_eq!(
            parse_net_dev(t),
            [("lo".to_string(), 2), ("cali1".to_string(), 42)]
        );
    }
}
