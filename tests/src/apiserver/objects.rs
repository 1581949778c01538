//! Pod and Namespace objects as the API server serialises them (the fields identity needs,
//! plus the usual scaffolding), and the field values selectors match on.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339, whole seconds, `Z` (Kubernetes' `metav1.Time`).
pub fn k8s_time(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .format(&Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A pod to create. Unset fields get the API server's defaults (a fresh UID, the current
/// time as creationTimestamp, `default` service account, phase Pending).
#[derive(Debug, Clone)]
pub struct PodBuilder {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub node: Option<String>,
    pub ips: Vec<String>,
    pub phase: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub host_network: bool,
    pub created: Option<i64>,
    pub terminating: bool,
    pub service_account: String,
}

impl PodBuilder {
    pub fn new(namespace: &str, name: &str) -> Self {
        PodBuilder {
            namespace: namespace.into(),
            name: name.into(),
            uid: None,
            node: None,
            ips: Vec::new(),
            phase: "Pending".into(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            host_network: false,
            created: None,
            terminating: false,
            service_account: "default".into(),
        }
    }

    /// A Running pod on `node` with one IP.
    pub fn running(namespace: &str, name: &str, node: &str, ip: &str) -> Self {
        PodBuilder::new(namespace, name)
            .node(node)
            .ip(ip)
            .phase("Running")
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.into());
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }
    /// Adds an IP (`status.podIPs`; the first is also `status.podIP`).
    pub fn ip(mut self, ip: &str) -> Self {
        self.ips.push(ip.into());
        self
    }
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }
    /// `iam.amazonaws.com/role`.
    pub fn role(self, role: &str) -> Self {
        self.annotation("iam.amazonaws.com/role", role)
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.into(), v.into());
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    /// creationTimestamp as Unix seconds.
    pub fn created(mut self, unix: i64) -> Self {
        self.created = Some(unix);
        self
    }
    /// With a deletionTimestamp (graceful deletion in progress).
    pub fn terminating(mut self) -> Self {
        self.terminating = true;
        self
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    /// The object as stored (no resourceVersion yet).
    pub(crate) fn to_json(&self, uid: &str, created: i64) -> Value {
        let mut meta = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": uid,
            "creationTimestamp": k8s_time(created),
        });
        if !self.annotations.is_empty() {
            meta["annotations"] = json!(self.annotations);
        }
        if !self.labels.is_empty() {
            meta["labels"] = json!(self.labels);
        }
        if self.terminating {
            meta["deletionTimestamp"] = json!(k8s_time(now_unix() + 30));
            meta["deletionGracePeriodSeconds"] = json!(30);
        }
        let mut spec = json!({
            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": self.service_account,
        });
        if let Some(n) = &self.node {
            spec["nodeName"] = json!(n);
        }
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let mut status = json!({ "phase": self.phase });
        if let Some(first) = self.ips.first() {
            status["podIP"] = json!(first);
            status["podIPs"] = json!(
                self.ips
                    .iter()
                    .map(|ip| json!({"ip": ip}))
                    .collect::<Vec<_>>()
            );
            status["hostIP"] = json!("10.0.0.1");
        }
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": status})
    }
}

/// A Namespace object (no resourceVersion yet).
pub(crate) fn namespace_json(
    name: &str,
    uid: &str,
    created: i64,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut meta = json!({
        "name": name,
        "uid": uid,
        "creationTimestamp": k8s_time(created),
        "labels": {"kubernetes.io/metadata.name": name},
    });
    if !annotations.is_empty() {
        meta["annotations"] = json!(annotations);
    }
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// The selectable fields of an object and its labels, as field and label selectors see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Fields {
    pub(crate) fields: BTreeMap<&'static str, String>,
    pub(crate) labels: BTreeMap<String, String>,
}

/// Field labels the real API server supports, per kind.
pub(crate) const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
pub(crate) const NAMESPACE_FIELDS: &[&str] = &["metadata.name", "status.phase"];

impl Fields {
    pub(crate) fn of(obj: &Value, supported: &[&'static str]) -> Fields {
        let mut fields = BTreeMap::new();
        for &f in supported {
            let mut v = obj;
            for part in f.split('.') {
                v = &v[part];
            }
            let s = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Null if f == "spec.hostNetwork" => "false".into(),
                _ => String::new(),
            };
            fields.insert(f, s);
        }
        let labels = obj["metadata"]["labels"]
            .as_object()
            .map(|m: &Map<String, Value>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Fields { fields, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_json_has_identity_fields_and_selectable_values() {
        let p = PodBuilder::running("shop", "web", "node-a", "10.1.0.5")
            .role("web-role")
            .host_network()
            .to_json("u-1", 1_704_164_645);
        assert_eq!(p["metadata"]["creationTimestamp"], "2024-01-02T03:04:05Z");
        assert_eq!(
            p["metadata"]["annotations"]["iam.amazonaws.com/role"],
            "web-role"
        );
        assert_eq!(p["status"]["podIPs"][0]["ip"], "10.1.0.5");
        let f = Fields::of(&p, POD_FIELDS);
        assert_eq!(f.fields["spec.nodeName"], "node-a");
        assert_eq!(f.fields["spec.hostNetwork"], "true");
        assert_eq!(f.fields["status.phase"], "Running");
        let unscheduled = PodBuilder::new("shop", "x").to_json("u-2", 0);
        let f = Fields::of(&unscheduled, POD_FIELDS);
        assert_eq!(f.fields["spec.nodeName"], "");
        assert_eq!(f.fields["spec.hostNetwork"], "false");
    }
}
