//! The redirect: the backend, the rule present and pointing here, kube2iam's leftovers.

use super::Check;
use crate::backend::{self, Choice};
use crate::rules::{self, IfaceMatch};
use crate::{RedirectConfig, cleanup, redirect};
use std::net::IpAddr;

/// What the iptables check needs of the agent's flags.
#[derive(Debug, Clone)]
pub struct Flags {
    pub iptables: bool,
    pub backend: Choice,
    /// Where kube2iam's leftover rules would point (the metadata address, and a literal
    /// `--metadata-addr` host).
    pub kube2iam_addrs: Vec<IpAddr>,
    /// The redirect the agent would install; None when the flags do not validate.
    pub redirect: Option<RedirectConfig>,
}

/// The redirect: backend, rule present and pointing here, leftovers.
pub fn check(flags: &Flags, ifaces: Option<&[IfaceMatch]>, emit: &mut impl FnMut(Check)) {
    const N: &str = "iptables";
    let inventory = cleanup::inventory();
    if inventory.is_empty() {
        let c = if flags.iptables {
            Check::fail(
                N,
                "no iptables tools found (iptables, iptables-save, iptables-restore); --iptables needs them in the agent's image",
            )
        } else {
            Check::warn(
                N,
                "no iptables tools found: cannot see how pods' metadata traffic is routed",
            )
        };
        emit(c);
        return;
    }
    // kube2iam's leftovers, in any backend.
    let addrs = &flags.kube2iam_addrs;
    for (b, f, view) in &inventory {
        let n = rules::kube2iam_rules(view, addrs).len();
        if n > 0 {
            emit(Check::warn(
                "kube2iam",
                format!(
                    "{n} kube2iam DNAT rule(s) to the metadata address left in nat PREROUTING ({f}, {b}); they send pods to an agent that may be gone; remove them with `iamlet cleanup --kube2iam-only` (keeps iamlet's rule)"
                ),
            ));
        }
    }
    let holders: Vec<String> = inventory
        .iter()
        .filter(|(_, _, v)| v.has_iamlet())
        .map(|(b, f, _)| format!("{f} {b}"))
        .collect();
    if !flags.iptables {
        if holders.is_empty() {
            emit(Check::ok(
                N,
                "--iptables is off and nothing of iamlet's is in the nat table; pods must reach iamlet by other means",
            ));
        } else {
            emit(Check::warn(
                N,
                format!(
                    "--iptables is off but an IAMLET chain exists ({}); if iamlet no longer manages this node, remove it with `iamlet cleanup`",
                    holders.join(", ")
                ),
            ));
        }
        return;
    }
    let (b, why) = match backend::detect(flags.backend) {
        Ok(r) => r,
        Err(e) => {
            emit(Check::fail(N, e.to_string()));
            return;
        }
    };
    let mixed: Vec<&String> = holders.iter().filter(|h| !h.ends_with(b.name())).collect();
    if !mixed.is_empty() {
        emit(Check::warn(
            N,
            format!(
                "iamlet's chain also exists in another backend ({}) than the one in use ({b}); run `iamlet cleanup` and restart iamlet",
                mixed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let (Some(redirect), Some(ifaces)) = (&flags.redirect, ifaces) else {
        emit(Check::warn(
            N,
            format!(
                "backend {b} ({why}); the rule cannot be checked until the flags and interfaces above are fixed"
            ),
        ));
        return;
    };
    for d in redirect::desired(redirect, ifaces.to_vec()) {
        let view = inventory
            .iter()
            .find(|(ib, f, _)| *ib == b && *f == d.family)
            .map(|(_, _, v)| v.clone());
        let Some(view) = view else {
            emit(Check::fail(
                N,
                format!(
                    "cannot read the {} nat table with the {b} backend",
                    d.family
                ),
            ));
            continue;
        };
        let problems = d.check(&view);
        let to = match d.to {
            rules::To::Dnat(a) => a.to_string(),
            rules::To::Redirect(p) => format!("port {p} (REDIRECT)"),
        };
        if problems.is_empty() {
            emit(Check::ok(
                N,
                format!(
                    "{} redirect in place ({b} backend, {why}): {} jumped to from the top of nat PREROUTING, {} rule(s) sending {}:80 to {to}",
                    d.family,
                    rules::CHAIN,
                    d.ifaces.len(),
                    d.metadata
                ),
            ));
        } else {
            let fix = if view.has_iamlet() {
                "the running iamlet restores its own rule within --iptables-verify-interval; if it persists, check that the agent's --host-ip, --app-port and --host-interface match these flags"
            } else {
                "start iamlet with --iptables (it installs the rule after binding its port)"
            };
            emit(Check::fail(
                N,
                format!(
                    "{} redirect ({b} backend) is not as wanted: {}; {fix}",
                    d.family,
                    rules::describe(&problems)
                ),
            ));
        }
    }
}
