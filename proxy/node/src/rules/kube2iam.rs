//! Removal: iamlet's chain and jumps, and kube2iam's leftover DNAT rules.

use super::*;

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
