//! What the redirect must look like in one family, rendered as rules and restore input, and
//! how a table differs from it.

use super::*;

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
