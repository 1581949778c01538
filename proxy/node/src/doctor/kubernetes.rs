//! The pod source: the file, or the API server with the RBAC iamlet needs.

use super::Check;
use iamlet_resolver::probe::{self, KubeProbeError};
use iamlet_resolver::source::kube::KubeOptions;
use std::path::Path;

const N: &str = "kubernetes";

/// `--pods-from` (local mode) or the API server; `namespaces`: `--namespace-restrictions`
/// (the namespaces are watched too).
pub fn check(pods_from: Option<&Path>, kube: &KubeOptions, namespaces: bool) -> Check {
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
    let access = match probe::kubernetes(kube, namespaces) {
        Ok(a) => a,
        Err(e) => return Check::fail(N, sentence(&e)),
    };
    let node = match &kube.node {
        Some(n) => format!("pods of node {n}"),
        None => "pods (no --node: every pod in the cluster; set --node=$(NODE_NAME))".into(),
    };
    if !access.denied.is_empty() {
        return Check::fail(
            N,
            format!(
                "the API server answers but RBAC denies {}; grant get/list/watch on pods (and namespaces with --namespace-restrictions) to iamlet's service account (ClusterRole + ClusterRoleBinding)",
                access.denied.join(", ")
            ),
        );
    }
    let text = format!("the API server answers and RBAC allows listing and watching {node}");
    if kube.node.is_none() {
        return Check::warn(N, text);
    }
    Check::ok(N, text)
}

/// The failure with what to do about it.
fn sentence(e: &KubeProbeError) -> String {
    const GRANT: &str = "grant get/list/watch on pods (and namespaces with --namespace-restrictions) to iamlet's service account";
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
