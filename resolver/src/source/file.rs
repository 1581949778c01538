//! Local mode: pods (and namespaces and ServiceAccounts) from a file, re-read when it
//! changes (in place or by rename).

use crate::StartError;
use crate::metrics::ResolverMetrics;
use crate::pod::{
    AnnotationKeys, NamespaceInfo, PodInfo, PodSink, ServiceAccountInfo, read_pods_file,
};
use crate::state::State;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
fn on_node(pod: &k8s_openapi::api::core::v1::Pod, node: Option<&str>) -> bool {
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
    let text = std::fs::read_to_string(path).map_err(|error| crate::pod::PodsFileError::Read {
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
        fn pod(&mut self, pod: k8s_openapi::api::core::v1::Pod) {
            if on_node(&pod, self.node) {
                self.on_node += 1;
                self.pods.extend(PodInfo::from_pod(&pod, self.keys));
            }
        }
        fn namespace(&mut self, ns: k8s_openapi::api::core::v1::Namespace) {
            self.namespaces.extend(NamespaceInfo::from_namespace(&ns));
        }
        fn service_account(&mut self, sa: k8s_openapi::api::core::v1::ServiceAccount) {
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
    state.index.reset_namespaces(infos.namespaces);
    state.index.reset_service_accounts(infos.service_accounts);
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
