//! The pod source: the file, or the API server with the RBAC iamlet needs.

use super::Check;
use iamlet_resolver::probe::{self, KubeProbeError, Watched};
use iamlet_resolver::source::kube::KubeOptions;
use std::path::Path;

const N: &str = "kubernetes";

/// As [`check_watching`], with ServiceAccounts watched (`--service-account-role-key`'s
/// default).
pub fn check(pods_from: Option<&Path>, kube: &KubeOptions, namespaces: bool) -> Check {
    check_watching(
        pods_from,
        kube,
        Watched {
            namespaces,
            service_accounts: true,
        },
    )
}

/// `--pods-from` (local mode) or the API server, with RBAC for every request the agent makes:
/// the pods' list and watch, and those of what `watched` says (namespaces with
/// `--namespace-restrictions`, ServiceAccounts unless `--service-account-role-key=`), and the
/// Events it writes. FAIL when pods or namespaces are refused (the agent cannot follow the
/// node), WARN when only ServiceAccounts or Events are (it serves, with less).
pub fn check_watching(pods_from: Option<&Path>, kube: &KubeOptions, watched: Watched) -> Check {
    if let Some(path) = pods_from {
        return match std::fs::metadata(path) {
            Ok(_) => Check::ok(
                N,
                format!(
                    "pods come from {} (local mode; no API server used)",
                    path.display()
                ),
            ),
            Err(e) => Check::fail(N, format!("--pods-from {}: {e}", path.display())),
        };
    }
    let access = match probe::kubernetes(kube, watched) {
        Ok(a) => a,
        Err(e) => return Check::fail(N, sentence(&e)),
    };
    let node = match &kube.node {
        Some(n) => format!("pods of node {n}"),
        None => "pods (no --node: every pod in the cluster; set --node=$(NODE_NAME))".into(),
    };
    let optional: Vec<String> = access
        .denied_service_accounts
        .iter()
        .chain(&access.denied_events)
        .cloned()
        .collect();
    if !access.denied.is_empty() {
        let mut denied = access.denied.clone();
        denied.extend(optional);
        return Check::fail(
            N,
            format!(
                "the API server answers but RBAC denies {}; {GRANT} (ClusterRole + ClusterRoleBinding)",
                denied.join(", ")
            ),
        );
    }
    // What was checked and allowed, so the line says exactly what it vouches for.
    let allowed = if access.allowed.is_empty() {
        String::new()
    } else {
        format!(" (allowed: {})", access.allowed.join(", "))
    };
    let text =
        format!("the API server answers and RBAC allows listing and watching {node}{allowed}");
    if !optional.is_empty() {
        // Pods are served, with less.
        let mut why = Vec::new();
        if !access.denied_service_accounts.is_empty() {
            why.push("pods get no role from their ServiceAccount's annotation (grant get/list/watch on serviceaccounts, or set --service-account-role-key= to not read them)");
        }
        if !access.denied_events.is_empty() {
            why.push("denials and STS failures are only logged, never Events on the pod (grant create/patch on events in group events.k8s.io)");
        }
        return Check::warn(
            N,
            format!(
                "{text}, but denies {}: {}",
                optional.join(", "),
                why.join("; ")
            ),
        );
    }
    if kube.node.is_none() {
        return Check::warn(N, text);
    }
    Check::ok(N, text)
}

/// What the agent needs, as the manifests grant it.
const GRANT: &str = "grant list/watch on pods (and namespaces with --namespace-restrictions), list/watch on serviceaccounts and create/patch on events.k8s.io events to iamlet's service account";

/// The failure with what to do about it.
fn sentence(e: &KubeProbeError) -> String {
    match e {
        KubeProbeError::Setup(e) => format!(
            "{e}; in a cluster this comes from the service account, else pass --kubeconfig or --api-server"
        ),
        KubeProbeError::Unauthorized => {
            format!("{e}; check the service account token or --api-token")
        }
        KubeProbeError::Forbidden(_) => format!("{e}; {GRANT}"),
        KubeProbeError::Unreachable(_) => {
            format!("{e}; check --api-server/--kubeconfig and the node's network path to it")
        }
        KubeProbeError::Status { .. } | KubeProbeError::Runtime(_) => e.to_string(),
    }
}
