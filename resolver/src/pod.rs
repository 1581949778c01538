//! The slice of a Pod (and Namespace) that identity needs, and how to read it from the API
//! objects or from a `kubectl get pods,namespaces -o yaml` file.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use thiserror::Error;

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
    pub role: String,
    pub external_id: String,
}

impl Default for AnnotationKeys {
    fn default() -> Self {
        AnnotationKeys {
            role: "iam.amazonaws.com/role".into(),
            external_id: "iam.amazonaws.com/external-id".into(),
        }
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

/// Errors reading a pods file.
#[derive(Debug, Error)]
pub enum PodsFileError {
    #[error("cannot read pods file {path}: {source}; check --pods-from")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "pods file {path} is not a Pod, Namespace or List in YAML or JSON ({source}); produce it with `kubectl get pods,namespaces -A -o yaml`"
    )]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
}

/// Objects found in a pods file.
#[derive(Debug, Default)]
pub struct PodsFile {
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
}

#[derive(Deserialize)]
struct Kinded {
    #[serde(default)]
    kind: String,
}

/// Parses a `List`, single objects, or multi-document YAML (JSON is YAML too).
/// Objects of other kinds are ignored.
pub fn parse_pods_file(path: &str, text: &str) -> Result<PodsFile, PodsFileError> {
    let mut out = PodsFile::default();
    let perr = |source| PodsFileError::Parse {
        path: path.to_owned(),
        source,
    };
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(perr)?;
        if value.is_null() {
            continue;
        }
        collect(value, &mut out).map_err(perr)?;
    }
    Ok(out)
}

fn collect(value: serde_yaml::Value, out: &mut PodsFile) -> Result<(), serde_yaml::Error> {
    let kind: Kinded = serde_yaml::from_value(value.clone())?;
    match kind.kind.as_str() {
        "Pod" => out.pods.push(serde_yaml::from_value(value)?),
        "Namespace" => out.namespaces.push(serde_yaml::from_value(value)?),
        k if k == "List" || k.ends_with("List") => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.iter().cloned() {
                    collect(item, out)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: web
    namespace: shop
    uid: u-1
    creationTimestamp: "2024-01-02T03:04:05Z"
    annotations:
      iam.amazonaws.com/role: web-role
      iam.amazonaws.com/external-id: ext-1
  spec:
    serviceAccountName: web-sa
    containers: [{name: c, image: i}]
  status:
    phase: Running
    podIP: 10.0.0.5
    podIPs: [{ip: 10.0.0.5}, {ip: "fd00::5"}]
- apiVersion: v1
  kind: Namespace
  metadata:
    name: shop
    annotations:
      iam.amazonaws.com/allowed-roles: '["web-*"]'
- apiVersion: v1
  kind: Service
  metadata: {name: ignored}
"#;

    #[test]
    fn list_yields_pods_and_namespaces_with_identity_fields() {
        let f = parse_pods_file("x", LIST).unwrap();
        assert_eq!(f.pods.len(), 1);
        assert_eq!(f.namespaces.len(), 1);
        let p = PodInfo::from_pod(&f.pods[0], &AnnotationKeys::default()).unwrap();
        assert_eq!(p.uid, "u-1");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.role.as_deref(), Some("web-role"));
        assert_eq!(p.external_id.as_deref(), Some("ext-1"));
        assert_eq!(p.service_account.as_deref(), Some("web-sa"));
        assert_eq!(p.phase, Phase::Running);
        assert_eq!(p.created, 1_704_164_645);
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(p.is_mappable());
        let ns = NamespaceInfo::from_namespace(&f.namespaces[0]).unwrap();
        assert_eq!(
            ns.annotations["iam.amazonaws.com/allowed-roles"],
            "[\"web-*\"]"
        );
    }

    #[test]
    fn multi_document_yaml_and_json_are_accepted() {
        let multi = "kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\n---\nkind: Pod\nmetadata: {name: b}\n";
        assert_eq!(parse_pods_file("x", multi).unwrap().pods.len(), 2);
        let json = r#"{"kind":"List","items":[{"kind":"Pod","metadata":{"name":"j"},"status":{"podIP":"10.1.1.1"}}]}"#;
        assert_eq!(parse_pods_file("x", json).unwrap().pods.len(), 1);
    }

    #[test]
    fn host_network_and_terminal_pods_are_not_mappable() {
        let y = "kind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.1}\n---\nkind: Pod\nmetadata: {name: d}\nstatus: {phase: Succeeded, podIP: 10.0.0.2}\n---\nkind: Pod\nmetadata: {name: f}\nstatus: {phase: Failed, podIP: 10.0.0.3}\n---\nkind: Pod\nmetadata: {name: noip}\nstatus: {phase: Pending}\n";
        let f = parse_pods_file("x", y).unwrap();
        for p in &f.pods {
            let info = PodInfo::from_pod(p, &AnnotationKeys::default()).unwrap();
            assert!(!info.is_mappable(), "{}", info.name);
        }
    }

    #[test]
    fn garbage_is_a_parse_error_naming_the_file() {
        let e = parse_pods_file("/tmp/p.yaml", "kind: Pod\nmetadata: [").unwrap_err();
        assert!(e.to_string().contains("/tmp/p.yaml"), "{e}");
    }
}
