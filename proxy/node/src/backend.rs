//! Which iptables the node uses. Rules added through iptables-legacy are invisible to
//! iptables-nft and the other way round, and both sets are evaluated, so a redirect added to
//! the wrong one "silently fails" (the node's own rules, e.g. kube-proxy's, are elsewhere and
//! operators do not find ours). The choice, in order:
//! 1. `--iptables-backend=nft|legacy` when given;
//! 2. the backend that already holds iamlet's chain (a restart keeps its rules where they are);
//! 3. the backend holding kube-proxy's `KUBE-IPTABLES-HINT` / `KUBE-KUBELET-CANARY` chain;
//! 4. the backend with more rules (as the iptables-wrapper script of Kubernetes images does);
//! 5. on a tie (e.g. no rules at all), the one `iptables -V` names, else nft.

use super::cmd;
use super::rules::{Family, NatView};
use std::fmt;
use thiserror::Error;

/// A backend's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// Only plain `iptables` is installed (no `-nft`/`-legacy` variants); it is whatever it is.
    System,
}

/// One of a backend's three tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Tables,
    Save,
    Restore,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::System => "system",
        }
    }

    /// E.g. `ip6tables-nft-restore`.
    pub fn tool(self, family: Family, tool: Tool) -> String {
        let variant = match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
            Backend::System => "",
        };
        let suffix = match tool {
            Tool::Tables => "",
            Tool::Save => "-save",
            Tool::Restore => "-restore",
        };
        format!("{}{variant}{suffix}", family.command())
    }

    /// Whether this backend's tools for `family` are installed.
    pub fn installed(self, family: Family) -> bool {
        [Tool::Tables, Tool::Save, Tool::Restore]
            .iter()
            .all(|t| cmd::which(&self.tool(family, *t)).is_some())
    }

    /// The backends whose IPv4 tools are installed: nft and legacy, or only the plain one.
    pub fn available() -> Vec<Backend> {
        let v: Vec<Backend> = [Backend::Nft, Backend::Legacy]
            .into_iter()
            .filter(|b| b.installed(Family::V4))
            .collect();
        if v.is_empty() && Backend::System.installed(Family::V4) {
            vec![Backend::System]
        } else {
            v
        }
    }

    /// `iptables-save` of both families (all tables); None when the tools fail (e.g. the
    /// kernel lacks that API). Reading does not create tables.
    pub fn save_all(self) -> Option<String> {
        let mut text = String::new();
        let mut any = false;
        for f in Family::ALL {
            if !self.installed(f) {
                continue;
            }
            if let Ok(out) = cmd::run(&self.tool(f, Tool::Save), &[], None)
                && out.ok()
            {
                any = true;
                text.push_str(&out.stdout);
            }
        }
        any.then_some(text)
    }

    /// The nat table of `family` as `save` prints it (empty view when it does not exist).
    pub fn nat(self, family: Family) -> Result<NatView, cmd::CommandError> {
        let save = self.tool(family, Tool::Save);
        let out = cmd::run_ok(&save, &[], None, || save.clone())?;
        Ok(NatView::parse(&out.stdout))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one backend's save output says about the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Survey {
    /// `-A` lines, all tables, both families.
    pub rules: usize,
    /// iamlet's chain exists in nat.
    pub has_iamlet: bool,
    /// kube-proxy's / kubelet's hint chains exist.
    pub kube_hint: bool,
}

impl Survey {
    pub fn of(save: &str) -> Survey {
        let mut s = Survey::default();
        for l in save.lines() {
            if l.starts_with("-A ") {
                s.rules += 1;
            }
            if l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ") {
                s.kube_hint = true;
            }
        }
        s.has_iamlet = NatView::parse(save).has_iamlet();
        s
    }
}

/// `iptables -V` → the backend it is: `iptables v1.8.9 (nf_tables)` is nft, `(legacy)` or
/// no suffix (before 1.8) is legacy.
pub fn parse_version(v: &str) -> Option<Backend> {
    let v = v.trim();
    if !v.starts_with("iptables v") && !v.starts_with("ip6tables v") {
        return None;
    }
    Some(if v.contains("nf_tables") {
        Backend::Nft
    } else {
        Backend::Legacy
    })
}

/// The decision, given what each installed backend holds (None: not installed or unreadable)
/// and what plain `iptables` is. Returns the backend and why (for the log and `doctor`).
pub fn choose(
    nft: Option<Survey>,
    legacy: Option<Survey>,
    default: Option<Backend>,
) -> (Backend, String) {
    let (n, l) = match (nft, legacy) {
        (None, None) => return (Backend::System, "only plain iptables is installed".into()),
        (Some(_), None) => return (Backend::Nft, "iptables-legacy is not installed".into()),
        (None, Some(_)) => return (Backend::Legacy, "iptables-nft is not installed".into()),
        (Some(n), Some(l)) => (n, l),
    };
    if n.has_iamlet != l.has_iamlet {
        let b = if n.has_iamlet {
            Backend::Nft
        } else {
            Backend::Legacy
        };
        return (b, "it already holds the IAMLET chain".into());
    }
    if n.kube_hint != l.kube_hint {
        let b = if n.kube_hint {
            Backend::Nft
        } else {
            Backend::Legacy
        };
        return (b, "kubelet/kube-proxy use it (KUBE-IPTABLES-HINT)".into());
    }
    if n.rules != l.rules {
        let b = if n.rules > l.rules {
            Backend::Nft
        } else {
            Backend::Legacy
        };
        return (
            b,
            format!(
                "it holds the node's rules ({} nft, {} legacy)",
                n.rules, l.rules
            ),
        );
    }
    match default {
        Some(Backend::Legacy) => (
            Backend::Legacy,
            "no rules in either; `iptables` is legacy here".into(),
        ),
        _ => (
            Backend::Nft,
            "no rules in either; `iptables` is nft here".into(),
        ),
    }
}

/// `--iptables-backend`: which iptables implementation `--iptables` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The one the host already uses (rules present, kube-proxy's hint), else the system
    /// default.
    Auto,
    Nft,
    Legacy,
}

/// No usable backend.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error(
        "--iptables-backend={backend} needs {tool} on PATH; install it or use --iptables-backend=auto."
    )]
    NotInstalled { backend: Backend, tool: String },
    #[error(
        "--iptables needs the iptables tools (iptables, iptables-save, iptables-restore) in the agent's image; none was found on PATH or in /usr/sbin."
    )]
    NoTools,
}

/// Detects (or takes from the flag) the backend, and says why it was chosen.
pub fn detect(flag: Choice) -> Result<(Backend, String), BackendError> {
    match flag {
        Choice::Nft | Choice::Legacy => {
            let b = if flag == Choice::Nft {
                Backend::Nft
            } else {
                Backend::Legacy
            };
            if !b.installed(Family::V4) {
                return Err(BackendError::NotInstalled {
                    backend: b,
                    tool: b.tool(Family::V4, Tool::Tables),
                });
            }
            Ok((b, "chosen by --iptables-backend".into()))
        }
        Choice::Auto => {
            let avail = Backend::available();
            if avail.is_empty() {
                return Err(BackendError::NoTools);
            }
            let survey = |b: Backend| {
                avail
                    .contains(&b)
                    .then(|| b.save_all().map(|t| Survey::of(&t)))
                    .flatten()
            };
            if avail == [Backend::System] {
                return Ok((Backend::System, "only plain iptables is installed".into()));
            }
            let default = cmd::run("iptables", &["-V"], None)
                .ok()
                .and_then(|o| parse_version(&o.stdout));
            Ok(choose(
                survey(Backend::Nft),
                survey(Backend::Legacy),
                default,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rules: usize, has_iamlet: bool, kube_hint: bool) -> Option<Survey> {
        Some(Survey {
            rules,
            has_iamlet,
            kube_hint,
        })
    }

    #[test]
    fn version_strings() {
        assert_eq!(
            parse_version("iptables v1.8.9 (nf_tables)\n"),
            Some(Backend::Nft)
        );
        assert_eq!(
            parse_version("iptables v1.8.7 (legacy)"),
            Some(Backend::Legacy)
        );
        assert_eq!(parse_version("iptables v1.6.1"), Some(Backend::Legacy));
        assert_eq!(parse_version("command not found"), None);
    }

    #[test]
    fn choice_table() {
        use Backend::*;
        let cases = [
            (s(0, false, false), s(0, false, false), Some(Nft), Nft),
            (s(0, false, false), s(0, false, false), Some(Legacy), Legacy),
            (s(0, false, false), s(0, false, false), None, Nft),
            (s(3, false, false), s(40, false, false), Some(Nft), Legacy),
            (s(40, false, false), s(3, false, false), Some(Legacy), Nft),
            // kube-proxy's hint beats counts.
            (s(2, false, true), s(40, false, false), Some(Legacy), Nft),
            // Our own chain beats everything: a restart stays put.
            (s(0, false, true), s(3, true, false), Some(Nft), Legacy),
            (None, s(0, false, false), Some(Nft), Legacy),
            (s(0, false, false), None, Some(Legacy), Nft),
            (None, None, None, System),
        ];
        for (n, l, d, want) in cases {
            assert_eq!(choose(n, l, d).0, want, "{n:?} {l:?} {d:?}");
        }
    }

    #[test]
    fn survey_counts_rules_and_hints() {
        let save = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:IAMLET - [0:0]\n-A PREROUTING -j IAMLET\n-A IAMLET -j RETURN\nCOMMIT\n*filter\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            Survey::of(save),
            Survey {
                rules: 3,
                has_iamlet: true,
                kube_hint: true
            }
        );
        assert_eq!(Survey::of(""), Survey::default());
    }

    #[test]
    fn tool_names() {
        assert_eq!(
            Backend::Nft.tool(Family::V6, Tool::Restore),
            "ip6tables-nft-restore"
        );
        assert_eq!(
            Backend::Legacy.tool(Family::V4, Tool::Save),
            "iptables-legacy-save"
        );
        assert_eq!(Backend::System.tool(Family::V4, Tool::Tables), "iptables");
    }
}
