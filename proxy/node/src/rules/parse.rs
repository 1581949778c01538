//! What `iptables -S` / `iptables-save` print, parsed into rules and their meaning.

use super::*;
use std::collections::BTreeSet;

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

    pub(crate) fn from_spec(chain: &str, args: Vec<String>) -> Rule {
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
