//! The redirect as iptables rules, as pure functions: render what must be there, parse what
//! `iptables -S` / `iptables-save` print, compare the two by meaning (not by spelling, which
//! differs a little between versions and backends), and write the `iptables-restore
//! --noflush` input that makes it so in one atomic step.

mod desired;
mod kube2iam;
mod parse;
#[cfg(test)]
mod tests;

pub use desired::{Desired, Problem, describe};
pub use kube2iam::{kube2iam_only_script, kube2iam_rules, removal_script};
pub use parse::{Meaning, NatView, Rule, quote, tokenize};

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The nat chain iamlet owns.
pub const CHAIN: &str = "IAMLET";
/// Port pods send metadata requests to.
pub const METADATA_PORT: u16 = 80;

/// Comment on the jump from PREROUTING. It names the metadata address so that kube2iam users' habitual
/// `iptables -t nat -S PREROUTING | grep 169.254.169.254` finds it, and says how to go.
fn jump_comment(metadata: IpAddr) -> String {
    format!(
        "iamlet: pod metadata requests to {metadata} go to the IAMLET chain; remove with iamlet cleanup"
    )
}

fn rule_comment() -> &'static str {
    "iamlet: pod metadata requests to the node agent"
}

/// Comment on the jump for the container-credentials address.
fn container_jump_comment(addr: IpAddr) -> String {
    format!(
        "iamlet: pod container-credentials requests to {addr} go to the IAMLET chain; remove with iamlet cleanup"
    )
}

fn container_rule_comment() -> &'static str {
    "iamlet: pod container-credentials requests to the node agent"
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `ipv4` / `ipv6` (metric label, log field).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// `iptables` / `ip6tables`.
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where redirected connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// `-j DNAT --to-destination IP:PORT` (kube2iam's form: `--host-ip:--app-port`).
    Dnat(SocketAddr),
    /// `-j REDIRECT --to-ports PORT`: the arriving interface's own address.
    Redirect(u16),
}

/// An `-i` match: `cali+` (a trailing `+` is iptables' prefix wildcard) or `! -i eth0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceMatch {
    pub name: String,
    pub negated: bool,
}

impl IfaceMatch {
    /// `name`, `name+` or `!name`.
    pub fn parse(value: &str) -> IfaceMatch {
        match value.strip_prefix('!') {
            Some(n) => IfaceMatch {
                name: n.trim().to_owned(),
                negated: true,
            },
            None => IfaceMatch {
                name: value.to_owned(),
                negated: false,
            },
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.name.ends_with('+')
    }

    /// Whether an interface called `iface` matches (negation included).
    pub fn matches(&self, iface: &str) -> bool {
        let hit = match self.name.strip_suffix('+') {
            Some(prefix) => iface.starts_with(prefix),
            None => iface == self.name,
        };
        hit != self.negated
    }
}

impl fmt::Display for IfaceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negated {
            f.write_str("!")?;
        }
        f.write_str(&self.name)
    }
}

fn quote_all(args: &[String]) -> String {
    args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

fn tcp_dport() -> [String; 6] {
    ["-p", "tcp", "-m", "tcp", "--dport", "80"].map(str::to_owned)
}

fn comment(text: &str) -> [String; 4] {
    [
        "-m".to_owned(),
        "comment".to_owned(),
        "--comment".to_owned(),
        text.to_owned(),
    ]
}
