//! Cluster mode: kube-runtime watchers feeding the index — pods (this node's, with a
//! `spec.nodeName` field selector, when `--node` is given), with namespace restrictions,
//! namespaces, and, unless `--service-account-role-key` is empty, ServiceAccounts (all
//! namespaces, metadata only). Each initial list (and each relist after a `410 Expired` or a
//! broken stream) is buffered and applied at once at `InitDone`; the first publish happens
//! only when every watcher has listed, and marks readiness.
//!
//! ServiceAccounts are the one exception to that wait: a cluster upgraded from kube2iam may
//! not grant `serviceaccounts` yet. When their list or watch is refused (403, or 404 from an
//! API server that does not serve them) the agent says once what to grant, counts it
//! (`iamlet_watch_errors_total{resource="serviceaccounts",kind="forbidden"}`), publishes
//! without ServiceAccount roles, and keeps retrying with the usual backoff, so rights granted
//! later take effect without a restart. When they are readable, the first publish waits for
//! their list like the others, so no pod briefly gets the default role instead of its
//! ServiceAccount's after a start.
//!
//! Lists are consistent reads (`ListSemantic::MostRecent`, kube-runtime 5's default, set
//! explicitly): `ListSemantic::Any` (`resourceVersion=0`) may be served from a lagging API
//! server cache, and after an IP was reused such a relist would bring a deleted pod's
//! identity back until the watch caught up (the churn test catches exactly that).

use crate::StartError;
use crate::metrics::{ResolverMetrics, WatchMetrics};
use crate::pod::{AnnotationKeys, NamespaceInfo, PodInfo, ServiceAccountInfo};
use crate::state::State;
use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::core::PartialObjectMeta;
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

/// One item from any watcher (boxed: a Pod is much larger than a Namespace).
enum Item {
    Pod(Box<watcher::Result<Event<Pod>>>),
    Namespace(Box<watcher::Result<Event<Namespace>>>),
    ServiceAccount(Box<watcher::Result<Event<PartialObjectMeta<ServiceAccount>>>>),
}

/// The HTTP status of an error the API server answered (not a transport failure).
fn api_status(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Bounded metric label for a watcher error.
fn error_kind(e: &watcher::Error) -> &'static str {
    match api_status(e) {
        Some(403) => return "forbidden",
        Some(404) => return "not_found",
        _ => {}
    }
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
/// Waits until RBAC lets the agent list and watch what it must (pods; namespaces with
/// restrictions). The watcher reports a list complete before it starts the watch, so with
/// `list` granted and `watch` refused the agent would publish, become ready and then never
/// see another change: a deleted pod's IP, reused, would keep answering with the deleted
/// pod's role. Refused, it says what to grant (once) and stays unready until it is; an API
/// server that cannot answer the question is not waited for.
async fn wait_for_watch_rights(client: &Client, restricted: bool, watch: &WatchMetrics) {
    let mut needed: Vec<(&str, &str, &str)> = crate::probe::WATCHED.to_vec();
    if restricted {
        needed.extend(crate::probe::WATCHED_NAMESPACES);
    }
    let mut told = false;
    let mut pause = Duration::from_millis(500);
    loop {
        let mut denied = Vec::new();
        for (group, resource, verb) in &needed {
            if crate::probe::may(client, group, resource, verb).await == Some(false) {
                denied.push(format!("{verb} {resource}"));
            }
        }
        if denied.is_empty() {
            if told {
                tracing::info!("RBAC allows listing and watching now; starting");
            }
            return;
        }
        if !told {
            tracing::warn!(
                denied = %denied.join(", "),
                "RBAC refuses what iamlet must do to follow pods; not ready until it is granted (grant get/list/watch on pods, and namespaces with --namespace-restrictions, to iamlet's ServiceAccount)"
            );
            told = true;
        }
        watch.error("pods", "forbidden");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

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
    let restricted = state.restrictions().is_some();
    wait_for_watch_rights(&client, restricted, &watch).await;

    let mut pod_cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
    if let Some(node) = &opts.node {
        pod_cfg = pod_cfg.fields(&format!("spec.nodeName={node}"));
    }
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), pod_cfg)
        .backoff(WatchBackoff::new())
        .map(|e| Item::Pod(Box::new(e)))
        .boxed();
    let namespaces: BoxStream<'static, Item> = if restricted {
        let cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
        watcher::watcher(Api::<Namespace>::all(client.clone()), cfg)
            .backoff(WatchBackoff::new())
            .map(|e| Item::Namespace(Box::new(e)))
            .boxed()
    } else {
        stream::pending().boxed()
    };
    let sa_roles = keys.service_accounts();
    let service_accounts: BoxStream<'static, Item> = if sa_roles {
        // Metadata only: the annotations are all identity reads of a ServiceAccount.
        let cfg = watcher::Config::default().list_semantic(ListSemantic::MostRecent);
        watcher::watcher(Api::<PartialObjectMeta<ServiceAccount>>::all(client), cfg)
            .backoff(WatchBackoff::new())
            .map(|e| Item::ServiceAccount(Box::new(e)))
            .boxed()
    } else {
        stream::pending().boxed()
    };
    let mut events = stream::select(stream::select(pods, namespaces), service_accounts);

    let mut first = Some(first);
    let mut pod_list: Relist<PodInfo> = Relist::default();
    let mut ns_list: Relist<NamespaceInfo> = Relist::default();
    let mut sa_list: Relist<ServiceAccountInfo> = Relist::default();
    let mut sa_refused = Refused::default();
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
            Item::ServiceAccount(ev) => match *ev {
                Ok(ev) => {
                    let done = matches!(ev, Event::InitDone);
                    let changed = on_service_account(ev, &keys, &mut state, &mut sa_list, &watch);
                    if done {
                        sa_refused.allowed();
                    }
                    changed
                }
                Err(e) => {
                    if !sa_refused.refused(&e, &keys) {
                        failed(&metrics, &watch, "serviceaccounts", &e);
                    } else {
                        metrics.source_error();
                        watch.error("serviceaccounts", error_kind(&e));
                    }
                    false
                }
            },
        };
        // Refused ServiceAccounts do not hold back the first publish (see the module doc).
        let sa_synced = !sa_roles || sa_list.synced || sa_refused.now;
        let synced = pod_list.synced && (ns_list.synced || !restricted) && sa_synced;
        if synced && (changed || first.is_some()) {
            state.publish();
            if let Some(f) = first.take() {
                f(Ok(()));
            }
        }
    }
}

/// Whether the ServiceAccount watch is refused (RBAC not granted yet), and whether that was
/// said: once per refusal streak, so a retry every 30 s does not repeat it.
#[derive(Debug, Default)]
struct Refused {
    /// The last list or watch attempt was refused.
    now: bool,
    /// The warning for this streak was logged.
    warned: bool,
}

impl Refused {
    /// True when `e` is a refusal (403, or 404: not served), which it then reports.
    fn refused(&mut self, e: &watcher::Error, keys: &AnnotationKeys) -> bool {
        let status = match api_status(e) {
            Some(s @ (403 | 404)) => s,
            _ => return false,
        };
        self.now = true;
        if !std::mem::replace(&mut self.warned, true) {
            let why = if status == 403 {
                "may not list and watch serviceaccounts (403)"
            } else {
                "finds no serviceaccounts resource on the API server (404)"
            };
            tracing::warn!(
                error = %e,
                "iamlet {why}, so pods get roles from their {} annotation and --default-role only, not from their ServiceAccount's {} annotation: grant get, list and watch on serviceaccounts in iamlet's ClusterRole (deploy/manifests/iamlet.yaml) and they are used without a restart (retrying with backoff), or set --service-account-role-key= to stop reading ServiceAccounts",
                keys.role,
                keys.service_account_role,
            );
        } else {
            tracing::debug!(error = %e, "serviceaccounts still refused; retrying");
        }
        true
    }

    /// A full list was applied.
    fn allowed(&mut self) {
        if self.warned {
            tracing::info!("serviceaccounts are readable now: ServiceAccount roles are in use");
        }
        *self = Refused::default();
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

/// Applies a ServiceAccount event; true when the index may have changed.
fn on_service_account(
    ev: Event<PartialObjectMeta<ServiceAccount>>,
    keys: &AnnotationKeys,
    state: &mut State,
    list: &mut Relist<ServiceAccountInfo>,
    metrics: &WatchMetrics,
) -> bool {
    let info =
        |sa: &PartialObjectMeta<ServiceAccount>| ServiceAccountInfo::from_meta(&sa.metadata, keys);
    match ev {
        Event::Init => {
            list.buffer.clear();
            if list.lists > 0 {
                metrics.relisted("serviceaccounts");
            }
            false
        }
        Event::InitApply(sa) => {
            // Only those with a role are kept: most of a cluster's ServiceAccounts have none.
            list.buffer.extend(info(&sa).filter(|s| s.role.is_some()));
            false
        }
        Event::InitDone => {
            let n = list.buffer.len();
            state.index.reset(list.buffer.drain(..));
            list.buffer.shrink_to(64);
            list.synced = true;
            list.lists += 1;
            tracing::info!(with_role = n, "serviceaccount list synced");
            true
        }
        Event::Apply(sa) => match info(&sa) {
            Some(info) => {
                state.index.apply_service_account(info);
                true
            }
            None => false,
        },
        Event::Delete(sa) => match info(&sa) {
            Some(info) => {
                state
                    .index
                    .delete_service_account(&info.namespace, &info.name);
                true
            }
            None => false,
        },
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
            state.index.reset(list.buffer.drain(..));
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

    fn api_error(code: u16) -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        })))
    }

    #[test]
    fn refusals_are_their_own_error_kinds_and_are_said_once_per_streak() {
        assert_eq!(error_kind(&api_error(403)), "forbidden");
        assert_eq!(error_kind(&api_error(404)), "not_found");
        assert_eq!(error_kind(&api_error(500)), "list_failed");
        let keys = AnnotationKeys::default();
        let mut r = Refused::default();
        assert!(
            !r.refused(&api_error(500), &keys),
            "a 500 is an ordinary failure"
        );
        assert!(!r.now);
        assert!(r.refused(&api_error(403), &keys));
        assert!(r.now && r.warned);
        assert!(r.refused(&api_error(403), &keys));
        r.allowed();
        assert!(!r.now && !r.warned, "a later refusal is said again");
    }

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
