//! Local mode (`--pods-from`): pods (and namespaces and ServiceAccounts) from a `kubectl get
//! pods,namespaces,serviceaccounts -A -o yaml` (or `-o json`) file, parsed here and re-read
//! when it changes (in place or by rename).

use crate::StartError;
use crate::metrics::ResolverMetrics;
use crate::pod::{AnnotationKeys, NamespaceInfo, PodInfo, ServiceAccountInfo};
use crate::state::State;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use serde::Deserialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// How often the file's metadata is checked.
pub const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_ns: m.mtime_nsec(),
        ctime_ns: m.ctime_nsec(),
    })
}

/// Whether a pod from the file belongs to this node: any pod without `--node`, else pods with
/// `spec.nodeName` equal to it or not scheduled yet.
fn on_node(pod: &Pod, node: Option<&str>) -> bool {
    match (node, pod.spec.as_ref().and_then(|s| s.node_name.as_deref())) {
        (Some(want), Some(have)) => want == have,
        _ => true,
    }
}

fn load(
    path: &Path,
    node: Option<&str>,
    keys: &AnnotationKeys,
    state: &mut State,
) -> Result<usize, StartError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| PodsFileError::Read {
        path: display.clone(),
        error,
    })?;
    /// Keeps what identity needs of each object as it is decoded.
    struct Infos<'a> {
        node: Option<&'a str>,
        keys: &'a AnnotationKeys,
        on_node: usize,
        pods: Vec<PodInfo>,
        namespaces: Vec<NamespaceInfo>,
        service_accounts: Vec<ServiceAccountInfo>,
    }
    impl PodSink for Infos<'_> {
        fn pod(&mut self, pod: Pod) {
            if on_node(&pod, self.node) {
                self.on_node += 1;
                self.pods.extend(PodInfo::from_pod(&pod, self.keys));
            }
        }
        fn namespace(&mut self, ns: Namespace) {
            self.namespaces.extend(NamespaceInfo::from_namespace(&ns));
        }
        fn service_account(&mut self, sa: ServiceAccount) {
            // Only those with a role: the rest change nothing (and with the key empty,
            // none has one).
            self.service_accounts.extend(
                ServiceAccountInfo::from_service_account(&sa, self.keys)
                    .filter(|s| s.role.is_some()),
            );
        }
    }
    let mut infos = Infos {
        node,
        keys,
        on_node: 0,
        pods: Vec::new(),
        namespaces: Vec::new(),
        service_accounts: Vec::new(),
    };
    read_pods_file(&display, &text, &mut infos)?;
    drop(text);
    state.index.reset(infos.pods);
    state.index.reset(infos.namespaces);
    state.index.reset(infos.service_accounts);
    state.publish();
    Ok(infos.on_node)
}

/// Loads the file once (reporting the result through `first`), then follows changes.
pub(crate) async fn run(
    path: PathBuf,
    node: Option<String>,
    keys: AnnotationKeys,
    mut state: State,
    metrics: ResolverMetrics,
    first: impl FnOnce(Result<(), StartError>),
) {
    let mut last = stamp(&path);
    match load(&path, node.as_deref(), &keys, &mut state) {
        Ok(n) => {
            tracing::info!(path = %path.display(), pods = n, "pods file loaded");
            first(Ok(()));
        }
        Err(e) => {
            first(Err(e));
            return;
        }
    }
    loop {
        tokio::time::sleep(POLL).await;
        let now = stamp(&path);
        if now == last || now.is_none() {
            continue;
        }
        last = now;
        match load(&path, node.as_deref(), &keys, &mut state) {
            Ok(n) => tracing::info!(path = %path.display(), pods = n, "pods file reloaded"),
            Err(e) => {
                metrics.source_error();
                tracing::warn!(error = %e, "pods file changed but could not be used; keeping the previous state");
            }
        }
    }
}

/// Errors reading a pods file.
#[derive(Debug, Error)]
pub enum PodsFileError {
    #[error("cannot read pods file {path}: {error}; check --pods-from")]
    Read { path: String, error: std::io::Error },
    #[error(
        "pods file {path} is not a Pod, Namespace, ServiceAccount or List in YAML or JSON ({error}); produce it with `kubectl get pods,namespaces,serviceaccounts -A -o yaml`"
    )]
    Parse {
        path: String,
        error: serde_yaml::Error,
    },
    #[error(
        "pods file {path} is not a Pod, Namespace, ServiceAccount or List in JSON ({error}); produce it with `kubectl get pods,namespaces,serviceaccounts -A -o json`"
    )]
    ParseJson {
        path: String,
        error: serde_json::Error,
    },
}

/// Objects found in a pods file.
#[derive(Debug, Default)]
pub struct PodsFile {
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
}

/// Where [`read_pods_file`] hands each object as soon as it is decoded, so a reader can keep
/// only what it needs (a `Pod` is kilobytes; what identity needs of it, a few hundred bytes).
pub trait PodSink {
    fn pod(&mut self, pod: Pod);
    fn namespace(&mut self, ns: Namespace);
    /// ServiceAccounts are dropped unless the sink wants them.
    fn service_account(&mut self, _sa: ServiceAccount) {}
}

impl PodSink for PodsFile {
    fn pod(&mut self, pod: Pod) {
        self.pods.push(pod);
    }
    fn namespace(&mut self, ns: Namespace) {
        self.namespaces.push(ns);
    }
    fn service_account(&mut self, sa: ServiceAccount) {
        self.service_accounts.push(sa);
    }
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
    read_pods_file(path, text, &mut out)?;
    Ok(out)
}

/// [`parse_pods_file`], handing each object to `out` as it is decoded.
pub fn read_pods_file(path: &str, text: &str, out: &mut dyn PodSink) -> Result<(), PodsFileError> {
    if text.trim_start().starts_with('{') {
        return parse_json(text, out).map_err(|error| PodsFileError::ParseJson {
            path: path.to_owned(),
            error,
        });
    }
    let perr = |error| PodsFileError::Parse {
        path: path.to_owned(),
        error,
    };
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(perr)?;
        if value.is_null() {
            continue;
        }
        collect(value, out).map_err(perr)?;
    }
    Ok(())
}

/// One object of a JSON pods file, its parts left as borrowed text until the kind is known:
/// a list of 10,000 pods is read without a document tree of the whole file (serde_yaml builds
/// one, several times the file's size), and each pod is decoded once, straight to its type.
#[derive(Deserialize)]
struct JsonObject<'a> {
    #[serde(default)]
    kind: String,
    #[serde(default, borrow)]
    metadata: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    spec: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    status: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    items: Vec<JsonObject<'a>>,
}

/// A JSON pods file: one object (`kubectl get -o json` writes a `List`) or several in a row.
fn parse_json(text: &str, out: &mut dyn PodSink) -> Result<(), serde_json::Error> {
    fn field<T: serde::de::DeserializeOwned>(
        raw: Option<&serde_json::value::RawValue>,
    ) -> Result<Option<T>, serde_json::Error> {
        raw.map(|r| serde_json::from_str(r.get())).transpose()
    }
    fn collect_json(o: JsonObject<'_>, out: &mut dyn PodSink) -> Result<(), serde_json::Error> {
        match o.kind.as_str() {
            "Pod" => out.pod(Pod {
                metadata: field(o.metadata)?.unwrap_or_default(),
                spec: field(o.spec)?,
                status: field(o.status)?,
            }),
            "Namespace" => out.namespace(Namespace {
                metadata: field(o.metadata)?.unwrap_or_default(),
                ..Namespace::default()
            }),
            // Only the metadata: the annotations are what identity reads.
            "ServiceAccount" => out.service_account(ServiceAccount {
                metadata: field(o.metadata)?.unwrap_or_default(),
                ..ServiceAccount::default()
            }),
            k if k == "List" || k.ends_with("List") => {
                for item in o.items {
                    collect_json(item, out)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    for o in serde_json::Deserializer::from_str(text).into_iter::<JsonObject<'_>>() {
        collect_json(o?, out)?;
    }
    Ok(())
}

fn collect(value: serde_yaml::Value, out: &mut dyn PodSink) -> Result<(), serde_yaml::Error> {
    let kind: Kinded = serde_yaml::from_value(value.clone())?;
    match kind.kind.as_str() {
        "Pod" => out.pod(serde_yaml::from_value(value)?),
        "Namespace" => out.namespace(serde_yaml::from_value(value)?),
        "ServiceAccount" => out.service_account(serde_yaml::from_value(value)?),
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
    use crate::pod::Phase;
    use std::net::IpAddr;

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
  kind: ServiceAccount
  metadata:
    name: web-sa
    namespace: shop
    uid: sa-1
    annotations:
      eks.amazonaws.com/role-arn: " arn:aws:iam::123456789012:role/web-sa "
  secrets: [{name: web-sa-token}]
- apiVersion: v1
  kind: ServiceAccount
  metadata: {name: default, namespace: shop}
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
    fn service_accounts_yield_their_role_annotation_trimmed() {
        let f = parse_pods_file("x", LIST).unwrap();
        let keys = AnnotationKeys::default();
        let sas: Vec<ServiceAccountInfo> = f
            .service_accounts
            .iter()
            .filter_map(|sa| ServiceAccountInfo::from_service_account(sa, &keys))
            .collect();
        assert_eq!(
            sas,
            [
                ServiceAccountInfo {
                    namespace: "shop".into(),
                    name: "web-sa".into(),
                    uid: "sa-1".into(),
                    role: Some("arn:aws:iam::123456789012:role/web-sa".into()),
                },
                ServiceAccountInfo {
                    namespace: "shop".into(),
                    name: "default".into(),
                    uid: "shop/default".into(),
                    role: None,
                },
            ]
        );
        // An empty key turns ServiceAccount roles off: the annotation is not read.
        let off = AnnotationKeys {
            service_account_role: String::new(),
            ..AnnotationKeys::default()
        };
        assert!(!off.service_accounts());
        let sa = ServiceAccountInfo::from_service_account(&f.service_accounts[0], &off).unwrap();
        assert_eq!(sa.role, None);
        // A pod without serviceAccountName runs as `default`.
        let p = PodInfo::from_pod(&f.pods[0], &keys).unwrap();
        assert_eq!(p.service_account_name(), "web-sa");
        let bare = parse_pods_file("x", "kind: Pod\nmetadata: {name: a}\n").unwrap();
        let p = PodInfo::from_pod(&bare.pods[0], &keys).unwrap();
        assert_eq!(p.service_account_name(), "default");
    }

    #[test]
    fn multi_document_yaml_and_json_are_accepted() {
        let multi = "kind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\n---\nkind: Pod\nmetadata: {name: b}\n";
        assert_eq!(parse_pods_file("x", multi).unwrap().pods.len(), 2);
        let json = r#"{"kind":"List","items":[{"kind":"Pod","metadata":{"name":"j"},"status":{"podIP":"10.1.1.1"}}]}"#;
        assert_eq!(parse_pods_file("x", json).unwrap().pods.len(), 1);
    }

    #[test]
    fn json_files_read_the_same_as_yaml() {
        // The same List as JSON (what `kubectl get -o json` writes) takes the JSON reader.
        let value: serde_json::Value = serde_yaml::from_str(LIST).unwrap();
        let json = serde_json::to_string_pretty(&value).unwrap();
        let (y, j) = (
            parse_pods_file("x", LIST).unwrap(),
            parse_pods_file("x", &json).unwrap(),
        );
        let keys = AnnotationKeys::default();
        let info = |f: &PodsFile| -> Vec<PodInfo> {
            f.pods
                .iter()
                .filter_map(|p| PodInfo::from_pod(p, &keys))
                .collect()
        };
        assert_eq!(info(&j), info(&y));
        let sas = |f: &PodsFile| -> Vec<ServiceAccountInfo> {
            f.service_accounts
                .iter()
                .filter_map(|sa| ServiceAccountInfo::from_service_account(sa, &keys))
                .collect()
        };
        assert_eq!(sas(&j).len(), 2);
        assert_eq!(sas(&j), sas(&y));
        assert_eq!(
            j.namespaces
                .iter()
                .filter_map(NamespaceInfo::from_namespace)
                .collect::<Vec<_>>(),
            y.namespaces
                .iter()
                .filter_map(NamespaceInfo::from_namespace)
                .collect::<Vec<_>>()
        );
        // Objects one after another, a bare Pod, and kinds that are not read.
        let stream = r#"{"kind":"Pod","metadata":{"name":"a"},"status":{"podIP":"10.0.0.1"}}
            {"kind":"PodList","metadata":{"resourceVersion":"7"},"items":[{"kind":"Pod","metadata":{"name":"b"}}]}
            {"kind":"Service","metadata":{"name":"s"},"spec":{"ports":[]}}"#;
        let f = parse_pods_file("x", stream).unwrap();
        let names: Vec<_> = f
            .pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, ["a", "b"]);
        // Broken JSON names the file and the place.
        let e = parse_pods_file("/tmp/p.json", r#"{"kind":"List","items":[{"kind":"Pod","#)
            .unwrap_err();
        assert!(e.to_string().contains("/tmp/p.json"), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
        let e =
            parse_pods_file("/tmp/p.json", r#"{"kind":"Pod","status":{"podIP":7}}"#).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
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
