//! The slice of a Pod (and Namespace, and ServiceAccount) that identity needs, and how to
//! read it from the API objects (the watchers' and the pods file's: `source::file` parses
//! the file).

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Lifecycle phase, as far as identity cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Unknown,
    Pending,
    Running,
    /// Succeeded or Failed: never mapped.
    Terminal,
}

/// Which annotation keys carry identity.
#[derive(Debug, Clone)]
pub struct AnnotationKeys {
    /// On the pod (`--iam-role-key`).
    pub role: String,
    /// On the pod (`--iam-external-id`).
    pub external_id: String,
    /// On the pod's ServiceAccount (`--service-account-role-key`): a full role ARN, used when
    /// the pod has no `role` annotation. Empty: ServiceAccounts are not read at all.
    pub service_account_role: String,
}

/// The ServiceAccount annotation EKS (IRSA, the pod-identity webhook) reads.
pub const EKS_ROLE_ARN: &str = "eks.amazonaws.com/role-arn";

impl Default for AnnotationKeys {
    fn default() -> Self {
        AnnotationKeys {
            role: "iam.amazonaws.com/role".into(),
            external_id: "iam.amazonaws.com/external-id".into(),
            service_account_role: EKS_ROLE_ARN.into(),
        }
    }
}

impl AnnotationKeys {
    /// Whether ServiceAccounts carry roles (and so are watched or read from the pods file).
    pub fn service_accounts(&self) -> bool {
        !self.service_account_role.is_empty()
    }
}

/// What the index keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub phase: Phase,
    pub host_network: bool,
    /// Unix seconds; 0 when absent.
    pub created: i64,
    pub terminating: bool,
    pub role: Option<String>,
    pub external_id: Option<String>,
    pub service_account: Option<String>,
}

impl PodInfo {
    /// Extracts identity fields; returns `None` for objects without a name.
    pub fn from_pod(pod: &Pod, keys: &AnnotationKeys) -> Option<PodInfo> {
        let meta = &pod.metadata;
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let uid = meta
            .uid
            .clone()
            .unwrap_or_else(|| format!("{namespace}/{name}"));
        let annotations = meta.annotations.as_ref();
        let ann = |k: &str| annotations.and_then(|a| a.get(k)).cloned();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => Phase::Running,
            Some("Pending") => Phase::Pending,
            Some("Succeeded") | Some("Failed") => Phase::Terminal,
            _ => Phase::Unknown,
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(s) = status {
            for ip in s.pod_ips.iter().flatten() {
                if let Ok(ip) = ip.ip.parse::<IpAddr>() {
                    push_unique(&mut ips, ip.to_canonical());
                }
            }
            if let Some(ip) = s.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()) {
                push_unique(&mut ips, ip.to_canonical());
            }
        }
        Some(PodInfo {
            uid,
            namespace,
            name,
            ips,
            phase,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            created: meta
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            terminating: meta.deletion_timestamp.is_some(),
            role: ann(&keys.role),
            external_id: ann(&keys.external_id),
            service_account: spec.and_then(|s| s.service_account_name.clone()),
        })
    }

    /// Whether this pod may be mapped to its IPs at all.
    pub fn is_mappable(&self) -> bool {
        !self.host_network && self.phase != Phase::Terminal && !self.ips.is_empty()
    }

    /// The ServiceAccount the pod runs as: `spec.serviceAccountName`, else `default` (what
    /// the API server's admission fills in; a hand-written pods file may leave it out).
    pub fn service_account_name(&self) -> &str {
        self.service_account.as_deref().unwrap_or("default")
    }
}

fn push_unique(ips: &mut Vec<IpAddr>, ip: IpAddr) {
    if !ips.contains(&ip) {
        ips.push(ip);
    }
}

/// What the index keeps of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

impl NamespaceInfo {
    pub fn from_namespace(ns: &Namespace) -> Option<NamespaceInfo> {
        Some(NamespaceInfo {
            name: ns.metadata.name.clone()?,
            annotations: ns.metadata.annotations.clone().unwrap_or_default(),
        })
    }
}

/// What the index keeps of a ServiceAccount: only those with a role annotation are kept at
/// all (a cluster has many ServiceAccounts, few with a role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The `--service-account-role-key` annotation, trimmed, when set and not empty.
    pub role: Option<String>,
}

impl ServiceAccountInfo {
    /// Extracts the role annotation; `None` for objects without a name.
    pub fn from_service_account(
        sa: &ServiceAccount,
        keys: &AnnotationKeys,
    ) -> Option<ServiceAccountInfo> {
        Self::from_meta(&sa.metadata, keys)
    }

    /// As [`ServiceAccountInfo::from_service_account`], from the metadata alone (all the
    /// watcher asks for).
    pub fn from_meta(meta: &ObjectMeta, keys: &AnnotationKeys) -> Option<ServiceAccountInfo> {
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let role = (keys.service_accounts())
            .then(|| meta.annotations.as_ref()?.get(&keys.service_account_role))
            .flatten()
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
        Some(ServiceAccountInfo {
            uid: meta
                .uid
                .clone()
                .unwrap_or_else(|| format!("{namespace}/{name}")),
            namespace,
            name,
            role,
        })
    }
}
