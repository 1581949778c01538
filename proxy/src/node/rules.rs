//! The redirect as iptables rules, as pure functions: render what must be there, parse what
//! `iptables -S` / `iptables-save` print, compare the two by meaning (not by spelling, which
//! differs a little between versions and backends), and write the `iptables-restore
//! --noflush` input that makes it so in one atomic step.

use std::collections::BTreeSet;
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

/// What one family's redirect must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub family: Family,
    /// The address pods send metadata requests to (169.254.169.254, fd00:ec2::254).
    pub metadata: IpAddr,
    /// One DNAT rule per entry.
    pub ifaces: Vec<IfaceMatch>,
    pub to: To,
}

impl Desired {
    fn dest(&self) -> String {
        format!("{}/{}", self.metadata, self.family.host_prefix())
    }

    /// The jump's arguments after `-A PREROUTING`: only metadata traffic enters the chain.
    pub fn jump_spec(&self) -> Vec<String> {
        let mut v = vec!["-d".to_owned(), self.dest()];
        v.extend(tcp_dport());
        v.extend(comment(&jump_comment(self.metadata)));
        v.extend(["-j".to_owned(), CHAIN.to_owned()]);
        v
    }

    /// Each DNAT rule's arguments after `-A IAMLET`, in order.
    pub fn rule_specs(&self) -> Vec<Vec<String>> {
        self.ifaces
            .iter()
            .map(|i| {
                let mut v = vec!["-d".to_owned(), self.dest()];
                if i.negated {
                    v.push("!".to_owned());
                }
                v.extend(["-i".to_owned(), i.name.clone()]);
                v.extend(tcp_dport());
                v.extend(comment(rule_comment()));
                match self.to {
                    To::Dnat(addr) => {
                        v.extend(["-j", "DNAT", "--to-destination"].map(str::to_owned));
                        v.push(addr.to_string());
                    }
                    To::Redirect(port) => {
                        v.extend(["-j", "REDIRECT", "--to-ports"].map(str::to_owned));
                        v.push(port.to_string());
                    }
                }
                v
            })
            .collect()
    }

    /// What is wrong with `view` (the nat table, or at least PREROUTING and IAMLET); empty
    /// when the redirect is exactly as desired.
    pub fn check(&self, view: &NatView) -> Vec<Problem> {
        let mut problems = Vec::new();
        if !view.chains.contains(CHAIN) {
            problems.push(Problem::NoChain);
        }
        let pre: Vec<&Rule> = view.chain_rules("PREROUTING").collect();
        let jumps = pre.iter().filter(|r| r.target() == Some(CHAIN)).count();
        let want_jump = Rule::from_spec("PREROUTING", self.jump_spec()).meaning();
        match pre.first() {
            _ if jumps == 0 => problems.push(Problem::NoJump),
            Some(first) if first.target() == Some(CHAIN) && first.meaning() == want_jump => {}
            Some(first) if first.target() == Some(CHAIN) => problems.push(Problem::JumpDiffers),
            _ => problems.push(Problem::JumpNotFirst),
        }
        if jumps > 1 {
            problems.push(Problem::ExtraJumps(jumps - 1));
        }
        if view.chains.contains(CHAIN) {
            let have: Vec<Meaning> = view.chain_rules(CHAIN).map(Rule::meaning).collect();
            let want: Vec<Meaning> = self
                .rule_specs()
                .into_iter()
                .map(|s| Rule::from_spec(CHAIN, s).meaning())
                .collect();
            if have != want {
                problems.push(Problem::RulesDiffer {
                    have: have.len(),
                    want: want.len(),
                });
            }
        }
        problems
    }

    /// `iptables-restore --noflush` input that leaves exactly one jump (at the top of
    /// PREROUTING) and exactly the desired rules in the chain, whatever `view` holds.
    /// Declaring the chain creates it, or flushes it when it exists.
    pub fn restore_script(&self, view: &NatView) -> String {
        let mut s = format!("*nat\n:{CHAIN} - [0:0]\n");
        for r in view.rules.iter().filter(|r| r.target() == Some(CHAIN)) {
            s.push_str(&r.delete_line());
        }
        s.push_str(&format!(
            "-I PREROUTING 1 {}\n",
            quote_all(&self.jump_spec())
        ));
        for spec in self.rule_specs() {
            s.push_str(&format!("-A {CHAIN} {}\n", quote_all(&spec)));
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// Input for `iptables-restore --noflush` that removes iamlet's chain and every jump to it
/// (and, with `kube2iam`, kube2iam's PREROUTING DNAT rules to `metadata`); None when there
/// is nothing to remove.
pub fn removal_script(view: &NatView, kube2iam_for: Option<&[IpAddr]>) -> Option<String> {
    let mut body = String::new();
    for r in view.rules.iter().filter(|r| r.target() == Some(CHAIN)) {
        body.push_str(&r.delete_line());
    }
    if let Some(addrs) = kube2iam_for {
        for r in kube2iam_rules(view, addrs) {
            body.push_str(&r.delete_line());
        }
    }
    let chain = view.chains.contains(CHAIN);
    if body.is_empty() && !chain {
        return None;
    }
    let mut s = String::from("*nat\n");
    if chain {
        s.push_str(&format!(":{CHAIN} - [0:0]\n"));
    }
    s.push_str(&body);
    if chain {
        s.push_str(&format!("-X {CHAIN}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// A restore script removing only kube2iam's leftover rules (iamlet's chain stays).
pub fn kube2iam_only_script(view: &NatView, addrs: &[IpAddr]) -> Option<String> {
    let rules = kube2iam_rules(view, addrs);
    if rules.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for r in rules {
        s.push_str(&r.delete_line());
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// kube2iam's rules: `-A PREROUTING -d <metadata>/32 [!] -i X -p tcp -m tcp --dport 80 -j DNAT
/// --to-destination H:P`, left behind when kube2iam was removed.
pub fn kube2iam_rules<'a>(view: &'a NatView, metadata: &[IpAddr]) -> Vec<&'a Rule> {
    view.chain_rules("PREROUTING")
        .filter(|r| {
            let m = r.meaning();
            m.target.as_deref() == Some("DNAT")
                && m.dport.as_deref() == Some("80")
                && m.dest
                    .as_ref()
                    .is_some_and(|d| metadata.iter().any(|a| *d == a.to_string()))
        })
        .collect()
}

/// A difference between the desired redirect and the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    NoChain,
    NoJump,
    /// The jump exists but another rule comes first in PREROUTING.
    JumpNotFirst,
    /// The first rule jumps to the chain but matches other traffic than it should.
    JumpDiffers,
    ExtraJumps(usize),
    RulesDiffer {
        have: usize,
        want: usize,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoChain => write!(f, "the {CHAIN} chain is missing"),
            Problem::NoJump => write!(f, "no jump to {CHAIN} in PREROUTING"),
            Problem::JumpNotFirst => {
                write!(f, "the jump to {CHAIN} is not the first PREROUTING rule")
            }
            Problem::JumpDiffers => write!(f, "the jump to {CHAIN} matches other traffic"),
            Problem::ExtraJumps(n) => write!(f, "{n} extra jump(s) to {CHAIN}"),
            Problem::RulesDiffer { have, want } => {
                write!(
                    f,
                    "the {CHAIN} chain holds {have} rule(s) that differ from the {want} wanted"
                )
            }
        }
    }
}

/// Joins problems for a log line.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// === parsing ===

/// One `-A CHAIN args...` line, its arguments unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub args: Vec<String>,
}

/// A rule's meaning as far as iamlet cares: comments and implied `-m tcp` are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Meaning {
    pub dest: Option<String>,
    pub iface: Option<IfaceMatch>,
    pub proto: Option<String>,
    pub dport: Option<String>,
    pub target: Option<String>,
    pub to: Option<String>,
    /// Any other match this code does not know (a rule with one never equals ours).
    pub other: BTreeSet<String>,
}

impl Rule {
    /// Parses `-A CHAIN ...` (from `-S` or a save file); None for other lines.
    pub fn parse(line: &str) -> Option<Rule> {
        let mut toks = tokenize(line.trim());
        if toks.len() < 2 || toks[0] != "-A" {
            return None;
        }
        let args = toks.split_off(2);
        Some(Rule {
            chain: toks.swap_remove(1),
            args,
        })
    }

    fn from_spec(chain: &str, args: Vec<String>) -> Rule {
        Rule {
            chain: chain.to_owned(),
            args,
        }
    }

    /// The value after the first `flag`.
    pub fn value(&self, flag: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == flag)?;
        self.args.get(i + 1).map(String::as_str)
    }

    /// The `-j` target.
    pub fn target(&self) -> Option<&str> {
        self.value("-j").or_else(|| self.value("--jump"))
    }

    pub fn meaning(&self) -> Meaning {
        let mut m = Meaning::default();
        let mut negate = false;
        let mut i = 0;
        let a = &self.args;
        while i < a.len() {
            let next = a.get(i + 1).cloned();
            match a[i].as_str() {
                "!" => {
                    negate = true;
                    i += 1;
                    continue;
                }
                "-d" | "--destination" => {
                    m.dest = next.map(|d| {
                        d.trim_end_matches("/32")
                            .trim_end_matches("/128")
                            .to_owned()
                    })
                }
                "-i" | "--in-interface" => {
                    m.iface = next.map(|name| IfaceMatch {
                        name,
                        negated: negate,
                    })
                }
                "-p" | "--protocol" => m.proto = next,
                "--dport" | "--destination-port" => m.dport = next,
                "-j" | "--jump" => m.target = next,
                "--to-destination" | "--to-ports" | "--to" => m.to = next,
                "-m" | "--match"
                    if next
                        .as_deref()
                        .is_some_and(|n| n == "tcp" || n == "comment") => {}
                "--comment" => {}
                other => {
                    let mut o = String::new();
                    if negate {
                        o.push_str("! ");
                    }
                    o.push_str(other);
                    if let Some(n) = &next {
                        o.push(' ');
                        o.push_str(n);
                    }
                    m.other.insert(o);
                }
            }
            negate = false;
            i += 2;
        }
        m
    }

    /// `-D CHAIN args...` (quoted for iptables-restore).
    pub fn delete_line(&self) -> String {
        format!("-D {} {}\n", self.chain, quote_all(&self.args))
    }

    /// The rule as `-A CHAIN args...`.
    pub fn text(&self) -> String {
        format!("-A {} {}", self.chain, quote_all(&self.args))
    }
}

/// The nat table (or the chains listed) as iptables printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatView {
    /// User-defined and built-in chains seen (`:NAME ...`, `-N NAME`, `-P NAME ...`).
    pub chains: BTreeSet<String>,
    pub rules: Vec<Rule>,
}

impl NatView {
    /// Parses `iptables -t nat -S [CHAIN]` output, or a save file (only its `*nat` table is
    /// read). Missing table: an empty view.
    pub fn parse(text: &str) -> NatView {
        let mut view = NatView::default();
        let has_tables = text.lines().any(|l| l.starts_with('*'));
        let mut in_nat = !has_tables;
        for line in text.lines().map(str::trim) {
            if let Some(t) = line.strip_prefix('*') {
                in_nat = t == "nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(rest) = line.strip_prefix(':') {
                if let Some(name) = rest.split_whitespace().next() {
                    view.chains.insert(name.to_owned());
                }
            } else if let Some(rest) = line
                .strip_prefix("-N ")
                .or_else(|| line.strip_prefix("-P "))
            {
                if let Some(name) = rest.split_whitespace().next() {
                    view.chains.insert(name.to_owned());
                }
            } else if let Some(r) = Rule::parse(line) {
                view.rules.push(r);
            }
        }
        view
    }

    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    /// Rules that jump to iamlet's chain (from any chain).
    pub fn jumps(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.target() == Some(CHAIN))
    }

    /// Whether anything of iamlet's is in this table.
    pub fn has_iamlet(&self) -> bool {
        self.chains.contains(CHAIN) || self.jumps().next().is_some()
    }
}

/// Splits a rule line like iptables-restore does: whitespace-separated, double quotes group,
/// backslash escapes the next character inside quotes.
pub fn tokenize(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_tok = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_tok = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_tok {
                    out.push(std::mem::take(&mut cur));
                    in_tok = false;
                }
            }
            c => {
                cur.push(c);
                in_tok = true;
            }
        }
    }
    if in_tok {
        out.push(cur);
    }
    out
}

/// Quotes one argument for iptables-restore when it needs it.
pub fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && !arg
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    {
        return arg.to_owned();
    }
    let mut s = String::from("\"");
    for c in arg.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(ifaces: &[&str]) -> Desired {
        Desired {
            family: Family::V4,
            metadata: IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
            ifaces: ifaces.iter().map(|i| IfaceMatch::parse(i)).collect(),
            to: To::Dnat("10.0.0.1:8181".parse().unwrap()),
        }
    }

    /// What iptables-save prints for `v4(&["cali+", "!eth0"])` once applied (captured from
    /// iptables 1.8.9, both backends print the same).
    const APPLIED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:IAMLET - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment "iamlet: pod metadata requests to 169.254.169.254 go to the IAMLET chain; remove with iamlet cleanup" -j IAMLET
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A IAMLET -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment "iamlet: pod metadata requests to the node agent" -j DNAT --to-destination 10.0.0.1:8181
-A IAMLET -d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -m comment --comment "iamlet: pod metadata requests to the node agent" -j DNAT --to-destination 10.0.0.1:8181
COMMIT
"#;

    #[test]
    fn tokenize_and_quote_round_trip() {
        assert_eq!(
            tokenize(r#"-A X -m comment --comment "a b \"c\"" -j Y"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b \"c\"",
                "-j",
                "Y"
            ]
        );
        assert_eq!(tokenize(r#"--comment """#), ["--comment", ""]);
        for s in ["plain", "a b", "q\"uote", "", "back\\slash"] {
            assert_eq!(tokenize(&quote(s)), [s], "{s}");
        }
    }

    #[test]
    fn applied_rules_check_clean_and_differences_are_named() {
        let d = v4(&["cali+", "!eth0"]);
        let view = NatView::parse(APPLIED);
        assert!(view.chains.contains(CHAIN));
        assert_eq!(d.check(&view), []);

        let cases: &[(&str, Vec<Problem>)] = &[
            // The jump deleted by hand.
            (
                "-A PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80",
                vec![Problem::NoJump],
            ),
            // Another rule inserted above it (kube2iam PR #21).
            (
                "-A PREROUTING -m comment --comment \"kubernetes service portals\"",
                vec![Problem::JumpNotFirst],
            ),
            // A DNAT rule removed from the chain.
            (
                "-A IAMLET -d 169.254.169.254/32 ! -i eth0",
                vec![Problem::RulesDiffer { have: 1, want: 2 }],
            ),
        ];
        for (drop_prefix, want) in cases {
            let text: String = APPLIED
                .lines()
                .filter(|l| !l.starts_with(drop_prefix))
                .map(|l| format!("{l}\n"))
                .collect();
            let text = if *drop_prefix
                == "-A PREROUTING -m comment --comment \"kubernetes service portals\""
            {
                // Move the portals rule to the top instead of dropping it.
                text.replacen(
                    "-A PREROUTING -d",
                    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -d",
                    1,
                )
            } else {
                text
            };
            assert_eq!(&d.check(&NatView::parse(&text)), want, "{drop_prefix}");
        }

        // Interfaces changed between runs: the old chain content differs.
        assert_eq!(
            v4(&["weave"]).check(&view),
            [Problem::RulesDiffer { have: 2, want: 1 }]
        );
        // Another target (e.g. --app-port changed).
        let mut other = v4(&["cali+", "!eth0"]);
        other.to = To::Dnat("10.0.0.1:8182".parse().unwrap());
        assert_eq!(
            other.check(&view),
            [Problem::RulesDiffer { have: 2, want: 2 }]
        );
        // Nothing at all.
        assert_eq!(
            d.check(&NatView::default()),
            [Problem::NoChain, Problem::NoJump]
        );
    }

    #[test]
    fn meaning_ignores_spelling_but_not_extra_matches() {
        let a = Rule::parse("-A IAMLET -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8181").unwrap();
        let b = Rule::parse("-A IAMLET -p tcp -d 169.254.169.254 -i cali+ --dport 80 -m comment --comment x -j DNAT --to-destination 10.0.0.1:8181").unwrap();
        assert_eq!(a.meaning(), b.meaning());
        let c = Rule::parse("-A IAMLET -d 169.254.169.254/32 -s 10.0.0.0/8 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8181").unwrap();
        assert_ne!(a.meaning(), c.meaning());
        let n = Rule::parse("-A IAMLET -d 169.254.169.254/32 ! -i cali+ -p tcp --dport 80 -j DNAT --to-destination 10.0.0.1:8181").unwrap();
        assert_eq!(
            n.meaning().iface,
            Some(IfaceMatch {
                name: "cali+".into(),
                negated: true
            })
        );
    }

    #[test]
    fn restore_script_replaces_every_jump_with_one_at_the_top() {
        let d = v4(&["cali+", "!eth0"]);
        let twice = APPLIED.replace(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A PREROUTING -i weave -j IAMLET",
        );
        let s = d.restore_script(&NatView::parse(&twice));
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":IAMLET - [0:0]");
        assert!(lines[2].starts_with("-D PREROUTING -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment \"iamlet: pod metadata requests to 169.254.169.254"));
        assert_eq!(lines[3], "-D PREROUTING -i weave -j IAMLET");
        assert!(lines[4].starts_with("-I PREROUTING 1 -d 169.254.169.254/32 "));
        assert_eq!(
            lines[5],
            "-A IAMLET -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -m comment --comment \"iamlet: pod metadata requests to the node agent\" -j DNAT --to-destination 10.0.0.1:8181"
        );
        assert!(lines[6].starts_with("-A IAMLET -d 169.254.169.254/32 ! -i eth0 -p tcp"));
        assert_eq!(lines[7], "COMMIT");
        assert_eq!(lines.len(), 8);
        // Rendered then parsed back: clean.
        let after = format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:IAMLET - [0:0]\n{}",
            s.lines()
                .filter(|l| l.starts_with("-I") || l.starts_with("-A"))
                .map(|l| l.replacen("-I PREROUTING 1", "-A PREROUTING", 1) + "\n")
                .collect::<String>()
        );
        assert_eq!(d.check(&NatView::parse(&after)), []);
    }

    #[test]
    fn ipv6_rules_use_128_and_brackets_or_redirect() {
        let d = Desired {
            family: Family::V6,
            metadata: IpAddr::V6("fd00:ec2::254".parse::<Ipv6Addr>().unwrap()),
            ifaces: vec![IfaceMatch::parse("eni+")],
            to: To::Dnat("[fd00::1]:8181".parse().unwrap()),
        };
        let spec = d.rule_specs().remove(0).join(" ");
        assert!(
            spec.starts_with("-d fd00:ec2::254/128 -i eni+ -p tcp"),
            "{spec}"
        );
        assert!(
            spec.ends_with("-j DNAT --to-destination [fd00::1]:8181"),
            "{spec}"
        );
        let r = Desired {
            to: To::Redirect(8181),
            ..d
        };
        assert!(
            r.rule_specs()[0]
                .join(" ")
                .ends_with("-j REDIRECT --to-ports 8181")
        );
    }

    #[test]
    fn removal_covers_jumps_chain_and_optionally_kube2iam() {
        let with_k2i = APPLIED.replace(
            "COMMIT\n# end",
            "",
        ).replace(
            "-A IAMLET -d 169.254.169.254/32 -i cali+",
            "-A PREROUTING -d 169.254.169.254/32 -i weave -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:8181\n-A IAMLET -d 169.254.169.254/32 -i cali+",
        );
        let view = NatView::parse(&with_k2i);
        let meta = [IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))];
        assert_eq!(kube2iam_rules(&view, &meta).len(), 1);
        let plain = removal_script(&view, None).unwrap();
        assert_eq!(plain.matches("-D ").count(), 1);
        assert!(
            plain.contains(":IAMLET - [0:0]\n-D PREROUTING") && plain.contains("-X IAMLET\nCOMMIT")
        );
        let all = removal_script(&view, Some(&meta)).unwrap();
        assert!(all.contains("-D PREROUTING -d 169.254.169.254/32 -i weave -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:8181\n"));
        assert_eq!(
            removal_script(
                &NatView::parse("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
                Some(&meta)
            ),
            None
        );
        // Only kube2iam's rule left: removed without touching a chain.
        let only = NatView::parse(
            "-P PREROUTING ACCEPT\n-A PREROUTING -d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:8181\n",
        );
        assert_eq!(
            removal_script(&only, Some(&meta)).unwrap(),
            "*nat\n-D PREROUTING -d 169.254.169.254/32 ! -i eth0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:8181\nCOMMIT\n"
        );
    }

    #[test]
    fn iface_matching() {
        let cases = [
            ("cali+", "cali123", true),
            ("cali+", "eth0", false),
            ("weave", "weave", true),
            ("weave", "weave2", false),
            ("!eth0", "cali1", true),
            ("!eth0", "eth0", false),
            ("!eni+", "eni9", false),
            ("+", "anything", true),
        ];
        for (pat, name, want) in cases {
            assert_eq!(IfaceMatch::parse(pat).matches(name), want, "{pat} {name}");
        }
    }
}
