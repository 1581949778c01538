//! What the redirect must look like in one family, rendered as rules and restore input, and
//! how a table differs from it.

use super::*;

/// What one family's redirect must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub family: Family,
    /// The address pods send metadata requests to (169.254.169.254, fd00:ec2::254).
    pub metadata: IpAddr,
    /// The container-credentials address (169.254.170.23, fd00:ec2::23), redirected beside
    /// the metadata address when set.
    pub container: Option<IpAddr>,
    /// One DNAT rule per entry (per address).
    pub ifaces: Vec<IfaceMatch>,
    pub to: To,
}

impl Desired {
    fn dest(&self, addr: IpAddr) -> String {
        format!("{addr}/{}", self.family.host_prefix())
    }

    /// The redirected addresses with their jump and rule comments, metadata first.
    fn addresses(&self) -> Vec<(IpAddr, String, &'static str)> {
        let mut v = vec![(self.metadata, jump_comment(self.metadata), rule_comment())];
        if let Some(c) = self.container {
            v.push((c, container_jump_comment(c), container_rule_comment()));
        }
        v
    }

    /// The jumps' arguments after `-A PREROUTING`, in order (one per address): only traffic
    /// to the redirected addresses enters the chain.
    pub fn jump_specs(&self) -> Vec<Vec<String>> {
        self.addresses()
            .into_iter()
            .map(|(addr, text, _)| {
                let mut v = vec!["-d".to_owned(), self.dest(addr)];
                v.extend(tcp_dport());
                v.extend(comment(&text));
                v.extend(["-j".to_owned(), CHAIN.to_owned()]);
                v
            })
            .collect()
    }

    /// Each DNAT rule's arguments after `-A IAMLET`, in order: every interface for the
    /// metadata address, then every interface for the container-credentials address.
    pub fn rule_specs(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for (addr, _, text) in self.addresses() {
            for i in &self.ifaces {
                let mut v = vec!["-d".to_owned(), self.dest(addr)];
                if i.negated {
                    v.push("!".to_owned());
                }
                v.extend(["-i".to_owned(), i.name.clone()]);
                v.extend(tcp_dport());
                v.extend(comment(text));
                match self.to {
                    To::Dnat(to) => {
                        v.extend(["-j", "DNAT", "--to-destination"].map(str::to_owned));
                        v.push(to.to_string());
                    }
                    To::Redirect(port) => {
                        v.extend(["-j", "REDIRECT", "--to-ports"].map(str::to_owned));
                        v.push(port.to_string());
                    }
                }
                out.push(v);
            }
        }
        out
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
        let want_jumps: Vec<Meaning> = self
            .jump_specs()
            .into_iter()
            .map(|s| Rule::from_spec("PREROUTING", s).meaning())
            .collect();
        // The wanted jumps are the first rules of PREROUTING, in order.
        let head: Vec<&&Rule> = pre.iter().take(want_jumps.len()).collect();
        if jumps == 0 {
            problems.push(Problem::NoJump);
        } else if head.len() < want_jumps.len() || head.iter().any(|r| r.target() != Some(CHAIN)) {
            problems.push(Problem::JumpNotFirst);
        } else if head.iter().map(|r| r.meaning()).collect::<Vec<_>>() != want_jumps {
            problems.push(Problem::JumpDiffers);
        }
        if jumps > want_jumps.len() {
            problems.push(Problem::ExtraJumps(jumps - want_jumps.len()));
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

    /// `iptables-restore --noflush` input that leaves exactly the desired jumps (one per
    /// address, at the top of PREROUTING) and exactly the desired rules in the chain,
    /// whatever `view` holds.
    /// Declaring the chain creates it, or flushes it when it exists.
    pub fn restore_script(&self, view: &NatView) -> String {
        let mut s = format!("*nat\n:{CHAIN} - [0:0]\n");
        for r in view.rules.iter().filter(|r| r.target() == Some(CHAIN)) {
            s.push_str(&r.delete_line());
        }
        for (i, jump) in self.jump_specs().iter().enumerate() {
            s.push_str(&format!("-I PREROUTING {} {}\n", i + 1, quote_all(jump)));
        }
        for spec in self.rule_specs() {
            s.push_str(&format!("-A {CHAIN} {}\n", quote_all(&spec)));
        }
        s.push_str("COMMIT\n");
        s
    }
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
