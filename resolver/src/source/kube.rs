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
//!
//! `run` builds the client and the three watchers; `follow` applies their merged stream,
//! each kind through the one generic `on_event` (what differs per kind is the `Followed`
//! trait), so tests feed `follow` a `stream::iter` of hand-built events.

use crate::StartError;
use crate::index::Kept;
use crate::metrics::{ResolverMetrics, WatchMetrics};
use crate::pod::{AnnotationKeys, NamespaceInfo, PodInfo, ServiceAccountInfo};
use crate::state::State;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event, ListSemantic};
use kube::{Api, Client, Resource};
use std::path::PathBuf;
use std::sync::Arc;
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

/// Watches until the process ends; reports the first full sync through `first`.
pub(crate) async fn run(
    opts: KubeOptions,
    keys: AnnotationKeys,
    state: State,
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
    let events = stream::select(stream::select(pods, namespaces), service_accounts);
    let node = opts.node.as_deref().unwrap_or("<all>");
    follow(events, &keys, state, &metrics, &watch, node, first).await;
}

/// Applies the watchers' merged `events` to `state` until they end (the real watchers never
/// do), publishing after each change once every list is in, and tells `first` of the first
/// publish. A parameter, so tests feed it a `stream::iter` of hand-built events.
async fn follow(
    mut events: impl Stream<Item = Item> + Unpin,
    keys: &AnnotationKeys,
    mut state: State,
    metrics: &ResolverMetrics,
    watch: &WatchMetrics,
    node: &str,
    first: impl FnOnce(Result<(), StartError>),
) {
    let restricted = state.restrictions().is_some();
    let sa_roles = keys.service_accounts();
    let mut first = Some(first);
    let mut pod_list: Relist<PodInfo> = Relist::default();
    let mut ns_list: Relist<NamespaceInfo> = Relist::default();
    let mut sa_list: Relist<ServiceAccountInfo> = Relist::default();
    let mut sa_refused = Refused::default();
    while let Some(item) = events.next().await {
        let changed = match item {
            Item::Pod(ev) => on_item(*ev, keys, &mut state, &mut pod_list, metrics, watch, node),
            Item::Namespace(ev) => {
                on_item(*ev, keys, &mut state, &mut ns_list, metrics, watch, node)
            }
            Item::ServiceAccount(ev) => match *ev {
                Ok(ev) => {
                    let done = matches!(ev, Event::InitDone);
                    let changed = on_event(ev, keys, &mut state, &mut sa_list, watch, node);
                    if done {
                        sa_refused.allowed();
                    }
                    changed
                }
                Err(e) => {
                    let resource = <PartialObjectMeta<ServiceAccount> as Followed>::RESOURCE;
                    if !sa_refused.refused(&e, keys) {
                        failed(metrics, watch, resource, &e);
                    } else {
                        metrics.source_error();
                        watch.error(resource, error_kind(&e));
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

/// A watched kind, as [`on_event`] applies it: what the index keeps of one object, and what
/// is said and counted of its lists.
trait Followed: Resource + Sized {
    type Info: Kept;
    /// The resource in metrics and logs (`iamlet_watch_*_total{resource}`).
    const RESOURCE: &'static str;
    /// Whether an event of this kind moves the resource version `/debug/store` shows, which
    /// is the last pod event's (the churn test judges answers against the pods' history).
    const VERSIONED: bool = false;
    /// Capacity the relist buffer keeps between lists.
    const KEPT_CAPACITY: usize;
    fn info(&self, keys: &AnnotationKeys) -> Option<Self::Info>;
    /// Whether a listed object is buffered for the reset.
    fn listed(_info: &Self::Info) -> bool {
        true
    }
    /// Says that a list of `n` was applied.
    fn synced(n: usize, node: &str);
}

impl Followed for Pod {
    type Info = PodInfo;
    const RESOURCE: &'static str = "pods";
    const VERSIONED: bool = true;
    const KEPT_CAPACITY: usize = 1024;
    fn info(&self, keys: &AnnotationKeys) -> Option<PodInfo> {
        PodInfo::from_pod(self, keys)
    }
    fn synced(n: usize, node: &str) {
        tracing::info!(pods = n, node, "pod list synced");
    }
}

impl Followed for Namespace {
    type Info = NamespaceInfo;
    const RESOURCE: &'static str = "namespaces";
    const KEPT_CAPACITY: usize = 1024;
    fn info(&self, _keys: &AnnotationKeys) -> Option<NamespaceInfo> {
        NamespaceInfo::from_namespace(self)
    }
    fn synced(n: usize, _node: &str) {
        tracing::info!(namespaces = n, "namespace list synced");
    }
}

impl Followed for PartialObjectMeta<ServiceAccount> {
    type Info = ServiceAccountInfo;
    const RESOURCE: &'static str = "serviceaccounts";
    const KEPT_CAPACITY: usize = 64;
    fn info(&self, keys: &AnnotationKeys) -> Option<ServiceAccountInfo> {
        ServiceAccountInfo::from_meta(&self.metadata, keys)
    }
    /// Only those with a role: most of a cluster's ServiceAccounts have none.
    fn listed(info: &ServiceAccountInfo) -> bool {
        info.role.is_some()
    }
    fn synced(n: usize, _node: &str) {
        tracing::info!(with_role = n, "serviceaccount list synced");
    }
}

/// Applies one watcher item of kind `T`, counting and saying its errors; true when the index
/// may have changed.
fn on_item<T: Followed>(
    item: watcher::Result<Event<T>>,
    keys: &AnnotationKeys,
    state: &mut State,
    list: &mut Relist<T::Info>,
    metrics: &ResolverMetrics,
    watch: &WatchMetrics,
    node: &str,
) -> bool {
    match item {
        Ok(ev) => on_event(ev, keys, state, list, watch, node),
        Err(e) => {
            failed(metrics, watch, T::RESOURCE, &e);
            false
        }
    }
}

/// Applies one event of kind `T`: a list is buffered from `Init` and replaces what the index
/// keeps of that kind at `InitDone`; a change or delete is applied at once. True when the
/// index may have changed.
fn on_event<T: Followed>(
    ev: Event<T>,
    keys: &AnnotationKeys,
    state: &mut State,
    list: &mut Relist<T::Info>,
    watch: &WatchMetrics,
    node: &str,
) -> bool {
    match ev {
        Event::Init => {
            list.buffer.clear();
            if list.lists > 0 {
                watch.relisted(T::RESOURCE);
            }
            false
        }
        Event::InitApply(obj) => {
            list.buffer.extend(obj.info(keys).filter(T::listed));
            false
        }
        Event::InitDone => {
            let n = list.buffer.len();
            state.index.reset(list.buffer.drain(..));
            list.buffer.shrink_to(T::KEPT_CAPACITY);
            list.synced = true;
            list.lists += 1;
            T::synced(n, node);
            true
        }
        Event::Apply(obj) => {
            if T::VERSIONED {
                state.resource_version = obj.meta().resource_version.as_deref().map(Arc::from);
            }
            match obj.info(keys) {
                Some(info) => {
                    info.apply_to(&mut state.index);
                    true
                }
                None => false,
            }
        }
        Event::Delete(obj) => {
            if T::VERSIONED {
                state.resource_version = obj.meta().resource_version.as_deref().map(Arc::from);
            }
            match obj.info(keys) {
                Some(info) => {
                    T::Info::delete(&mut state.index, info.key());
                    true
                }
                None => false,
            }
        }
    }
}

#[cfg(test)]
mod tests;
