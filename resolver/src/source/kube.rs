//! Cluster mode: kube-runtime watchers feeding the index — pods (this node's, with a
//! `spec.nodeName` field selector, when `--node` is given) and, with namespace
//! restrictions, namespaces. Each initial list (and each relist after a `410 Expired` or a
//! broken stream) is buffered and applied at once at `InitDone`; the first publish happens
//! only when every watcher has listed, and marks readiness.
//!
//! Lists are consistent reads (`ListSemantic::MostRecent`, kube-runtime 5's default, set
//! explicitly): `ListSemantic::Any` (`resourceVersion=0`) may be served from a lagging API
//! server cache, and after an IP was reused such a relist would bring a deleted pod's
//! identity back until the watch caught up (the churn test catches exactly that).

use crate::StartError;
use crate::metrics::{ResolverMetrics, WatchMetrics};
use crate::pod::{AnnotationKeys, NamespaceInfo, PodInfo};
use crate::state::State;
use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event, ListSemantic};
use kube::{Api, Client};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// How to reach the API server (kube2iam's flags).
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub api_token: Option<String>,
    pub insecure: bool,
    /// Watch only pods with `spec.nodeName=<node>`.
    pub node: Option<String>,
}

/// The API server configuration is unusable; the sentence names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct KubeSetupError {
    what: String,
    detail: String,
}

fn setup_error(what: impl Into<String>, detail: impl ToString) -> KubeSetupError {
    KubeSetupError {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// The Kubernetes client from kube2iam's flags; `timeout` bounds connecting and each read
/// (None: kube's defaults, which a watch needs).
pub(crate) async fn client(
    opts: &KubeOptions,
    timeout: Option<Duration>,
) -> Result<Client, KubeSetupError> {
    let mut config = if let Some(path) = &opts.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| setup_error(format!("cannot read --kubeconfig {}", path.display()), e))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| setup_error("invalid --kubeconfig", e))?
    } else if let Some(server) = &opts.api_server {
        let uri = server.parse().map_err(|e| {
            setup_error(
                format!("invalid --api-server {server:?} (expected https://host:port)"),
                e,
            )
        })?;
        let mut c = kube::Config::new(uri);
        if let Some(token) = &opts.api_token {
            c.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
                .map_err(|e| setup_error("invalid --api-token", e))?;
        }
        c
    } else {
        kube::Config::infer().await.map_err(|e| {
            setup_error("no Kubernetes API configuration (not in a cluster, no --kubeconfig or --api-server, and no --pods-from)", e)
        })?
    };
    if opts.insecure {
        config.accept_invalid_certs = true;
    }
    if let Some(t) = timeout {
        config.read_timeout = Some(t);
        config.connect_timeout = Some(t);
    }
    Client::try_from(config).map_err(|e| setup_error("cannot build the Kubernetes client", e))
}

/// Retry delays after watch errors: 250 ms doubling to 30 s, ±50 % jitter, back to the start
/// after any successful event (kube-runtime's `StreamBackoff` resets on success).
#[derive(Debug)]
struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        WatchBackoff {
            next: Self::MIN,
            seed: ahash::RandomState::new().hash_one(0u8) | 1,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // xorshift for the jitter: uniform in [base/2, base*3/2).
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = (self.seed % 1000) as u32;
        Some(base / 2 + base * frac / 1000)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// One item from either watcher (boxed: a Pod is much larger than a Namespace).
enum Item {
    Pod(Box<watcher::Result<Event<Pod>>>),
    Namespace(Box<watcher::Result<Event<Namespace>>>),
}

/// Bounded metric label for a watcher error.
fn error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "list_failed",
        watcher::Error::WatchStartFailed(_) => "watch_start_failed",
        watcher::Error::WatchError(s) if s.code == 410 => "expired",
        watcher::Error::WatchError(_) => "watch_error",
        watcher::Error::WatchFailed(_) => "stream_failed",
        watcher::Error::NoResourceVersion => "no_resource_version",
    }
}

/// Follows one watcher's Init / InitApply / InitDone cycle.
struct Relist<T> {
    buffer: Vec<T>,
    synced: bool,
    lists: u64,
}

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Relist {
            buffer: Vec::new(),
            synced: false,
            lists: 0,
        }
    }
}

/// Watches until the process ends; reports the first full sync through `first`.
pub(crate) async fn run(
    opts: KubeOptions,
    keys: AnnotationKeys,
    mut state: State,
    metrics: ResolverMetrics,
    watch: WatchMetrics,
    reports: mpsc::Receiver<crate::events::Report>,
    first: impl FnOnce(Result<(), StartError>),
) {
    let client = match client(&opts, None).await {
        Ok(c) => c,
        Err(e) => {
            first(Err(e.into()));
            return;
        }
    };
    let instance = opts.node.clone().unwrap_or_else(|| "iamlet".into());
    tokio::spawn(crate::events::run(reports, Some(client.clone()), instance));

    let mut pod_cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
    if let Some(node) = &opts.node {
        pod_cfg = pod_cfg.fields(&format!("spec.nodeName={node}"));
    }
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), pod_cfg)
        .backoff(WatchBackoff::new())
        .map(|e| Item::Pod(Box::new(e)))
        .boxed();
    let restricted = state.restrictions().is_some();
    let namespaces: BoxStream<'static, Item> = if restricted {
        let cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
        watcher::watcher(Api::<Namespace>::all(client), cfg)
            .backoff(WatchBackoff::new())
            .map(|e| Item::Namespace(Box::new(e)))
            .boxed()
    } else {
        stream::pending().boxed()
    };
    let mut events = stream::select(pods, namespaces);

    let mut first = Some(first);
    let mut pod_list: Relist<PodInfo> = Relist::default();
    let mut ns_list: Relist<NamespaceInfo> = Relist::default();
    let node = opts.node.as_deref().unwrap_or("<all>");
    while let Some(item) = events.next().await {
        let changed = match item {
            Item::Pod(ev) => match *ev {
                Ok(ev) => on_pod(ev, &keys, &mut state, &mut pod_list, &watch, node),
                Err(e) => {
                    failed(&metrics, &watch, "pods", &e);
                    false
                }
            },
            Item::Namespace(ev) => match *ev {
                Ok(ev) => on_namespace(ev, &mut state, &mut ns_list, &watch),
                Err(e) => {
                    failed(&metrics, &watch, "namespaces", &e);
                    false
                }
            },
        };
        let synced = pod_list.synced && (ns_list.synced || !restricted);
        if changed && synced {
            state.publish();
            if let Some(f) = first.take() {
                f(Ok(()));
            }
        }
    }
}

fn failed(
    metrics: &ResolverMetrics,
    watch: &WatchMetrics,
    resource: &'static str,
    e: &watcher::Error,
) {
    metrics.source_error();
    let kind = error_kind(e);
    watch.error(resource, kind);
    if kind == "expired" {
        tracing::info!(resource, "watch expired (410); relisting");
    } else {
        tracing::warn!(resource, error = %e, "watch failed; retrying");
    }
}

/// Applies a pod event; true when the index may have changed.
fn on_pod(
    ev: Event<Pod>,
    keys: &AnnotationKeys,
    state: &mut State,
    list: &mut Relist<PodInfo>,
    metrics: &WatchMetrics,
    node: &str,
) -> bool {
    match ev {
        Event::Init => {
            list.buffer.clear();
            if list.lists > 0 {
                metrics.relisted("pods");
            }
            false
        }
        Event::InitApply(p) => {
            list.buffer.extend(PodInfo::from_pod(&p, keys));
            false
        }
        Event::InitDone => {
            let n = list.buffer.len();
            state.index.reset(list.buffer.drain(..));
            list.buffer.shrink_to(1024);
            list.synced = true;
            list.lists += 1;
            tracing::info!(pods = n, node, "pod list synced");
            true
        }
        Event::Apply(p) => {
            state.resource_version = p.metadata.resource_version.clone();
            match PodInfo::from_pod(&p, keys) {
                Some(info) => state.index.apply(info),
                None => return false,
            }
            true
        }
        Event::Delete(p) => {
            state.resource_version = p.metadata.resource_version.clone();
            match PodInfo::from_pod(&p, keys) {
                Some(info) => state.index.delete(&info.uid),
                None => return false,
            }
            true
        }
    }
}

/// Applies a namespace event; true when the index may have changed.
fn on_namespace(
    ev: Event<Namespace>,
    state: &mut State,
    list: &mut Relist<NamespaceInfo>,
    metrics: &WatchMetrics,
) -> bool {
    match ev {
        Event::Init => {
            list.buffer.clear();
            if list.lists > 0 {
                metrics.relisted("namespaces");
            }
            false
        }
        Event::InitApply(ns) => {
            list.buffer.extend(NamespaceInfo::from_namespace(&ns));
            false
        }
        Event::InitDone => {
            let n = list.buffer.len();
            state.index.reset_namespaces(list.buffer.drain(..));
            list.synced = true;
            list.lists += 1;
            tracing::info!(namespaces = n, "namespace list synced");
            true
        }
        Event::Apply(ns) => match NamespaceInfo::from_namespace(&ns) {
            Some(info) => {
                state.index.apply_namespace(info);
                true
            }
            None => false,
        },
        Event::Delete(ns) => match ns.metadata.name.as_deref() {
            Some(name) => {
                state.index.delete_namespace(name);
                true
            }
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = WatchBackoff::new();
        let first = b.next().unwrap();
        assert!(first >= Duration::from_millis(125) && first < Duration::from_millis(375));
        for _ in 0..20 {
            assert!(b.next().unwrap() < Duration::from_secs(45));
        }
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(375));
    }
}
