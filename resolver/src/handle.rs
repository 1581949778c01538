//! The handle the data plane uses: a lock-free snapshot reader, waiting for an IP, readiness,
//! reporting denials and credential errors as Kubernetes Events, and the `/debug/store`
//! dump. No tokio or kube type appears in its public signatures.

use crate::events::{Report, ReportKind};
use crate::snapshot::{Identity, Snapshot};
use arc_swap::{ArcSwap, Cache};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::{Notify, mpsc};

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) published: Notify,
    ready: AtomicBool,
    /// Denials and credential errors to turn into Kubernetes Events (set at start).
    pub(crate) reports: OnceLock<mpsc::Sender<Report>>,
    pub(crate) started: Instant,
    /// Service-account token keys (the container-credentials door).
    pub(crate) keys: Arc<crate::tokens::Keys>,
    /// UIDs of the pods most recently removed from the index (oldest first): a token of a
    /// pod that is gone is refused as such, not as one not synced yet.
    pub(crate) gone: Mutex<std::collections::VecDeque<String>>,
}

/// Removed pods remembered for [`Handle::pod_gone`].
const GONE_KEPT: usize = 4096;

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            published: Notify::new(),
            ready: AtomicBool::new(false),
            reports: OnceLock::new(),
            started: Instant::now(),
            keys: Arc::default(),
            gone: Mutex::default(),
        })
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// A pod left the index (deleted, or finished).
    pub(crate) fn pod_gone(&self, uid: &str) {
        let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        if gone.len() >= GONE_KEPT {
            gone.pop_front();
        }
        gone.push_back(uid.to_owned());
    }
}

/// Cheap to clone; shared by every worker.
#[derive(Clone, Debug)]
pub struct Handle {
    shared: Arc<Shared>,
}

/// A per-worker snapshot reader (an `arc_swap::Cache`: one pointer compare per load).
pub struct SnapshotReader {
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
}

impl SnapshotReader {
    #[inline]
    pub fn load(&mut self) -> &Arc<Snapshot> {
        self.cache.load()
    }
}

impl Handle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Handle { shared }
    }

    /// Whether the pod with `uid` was on this node and has left it (deleted or finished),
    /// as far as the last few thousand removals go. Error path only: takes a lock.
    pub fn pod_gone(&self, uid: &str) -> bool {
        let gone = self.shared.gone.lock().unwrap_or_else(|e| e.into_inner());
        gone.iter().any(|u| u == uid)
    }

    /// Whether the key set in use holds `kid` (no reference count taken: the door asks on
    /// every request it answers from memory).
    pub fn has_token_key(&self, kid: &str) -> bool {
        self.shared
            .keys
            .current
            .load()
            .as_ref()
            .is_some_and(|k| k.get(kid).is_some())
    }

    /// With `--token-review`: the API server's word on a token (whose key is not known here,
    /// or whose pod this agent has not seen). Callers bound the wait.
    pub async fn review_token(&self, token: &str) -> crate::tokens::Verdict {
        use crate::tokens::Verdict;
        let Some(tx) = self.shared.keys.reviews.get() else {
            return Verdict::Unknown;
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = tx.try_send(crate::tokens::Review {
            token: token.to_owned(),
            reply,
        });
        if asked.is_err() {
            return Verdict::Unknown;
        }
        answer.await.unwrap_or(Verdict::Unknown)
    }

    /// Whether TokenReview is on (`--token-review`).
    pub fn reviews_tokens(&self) -> bool {
        self.shared.keys.reviews.get().is_some()
    }

    /// The service-account token keys in use, if any were read yet.
    pub fn token_keys(&self) -> Option<Arc<crate::tokens::KeySet>> {
        self.shared.keys.current.load_full()
    }

    /// A token named a key that is not in the set: asks for the set again (the resolver
    /// fetches at most once per `tokens::MIN_REFETCH`) and resolves after the next attempt,
    /// whatever its outcome. Callers bound the wait.
    pub async fn refetch_token_keys(&self) {
        let fetched = self.shared.keys.fetched.notified();
        tokio::pin!(fetched);
        fetched.as_mut().enable();
        self.shared.keys.refetch.notify_one();
        fetched.await;
    }

    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            cache: Cache::new(self.shared.snapshot.clone()),
        }
    }

    /// The current snapshot (allocation-free, but takes a reference count).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// True once the first full list has been published.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Resolves when a published snapshot maps `ip`. Sleeps on the resolver's publish
    /// notification; callers bound it with a timeout.
    pub async fn wait_for_ip(&self, ip: IpAddr) -> Arc<Identity> {
        loop {
            let notified = self.shared.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(id) = self.shared.snapshot.load().get(&ip) {
                return id.clone();
            }
            notified.await;
        }
    }

    /// A request from `identity` was refused by a namespace restriction: records an
    /// `IamRoleDenied` Event on the pod (at most one per pod a minute). Never blocks.
    pub fn report_denied(&self, identity: &Arc<Identity>) {
        self.report(identity, ReportKind::Denied, None);
    }

    /// As [`Handle::report_denied`], for a request that came `via` another door than IMDS
    /// (the Event says which, and which token).
    pub fn report_denied_via(&self, identity: &Arc<Identity>, via: String) {
        self.report(identity, ReportKind::Denied, Some(via));
    }

    /// As [`Handle::report_credential_error`], for a request that came `via` another door.
    pub fn report_credential_error_via(&self, identity: &Arc<Identity>, via: String) {
        self.report(identity, ReportKind::CredentialError, Some(via));
    }

    /// A request from `identity` was answered with an STS failure: records an
    /// `IamCredentialError` Event on the pod (at most one per pod a minute). Never blocks.
    pub fn report_credential_error(&self, identity: &Arc<Identity>) {
        self.report(identity, ReportKind::CredentialError, None);
    }

    fn report(&self, identity: &Arc<Identity>, kind: ReportKind, detail: Option<String>) {
        let now_ms = self.shared.started.elapsed().as_millis() as u64 + 1;
        let every = crate::events::EVERY.as_millis() as u64;
        if !identity.claim_report(kind as usize, now_ms, every) {
            return;
        }
        if let Some(tx) = self.shared.reports.get() {
            // A full queue drops the report: events are advisory, requests never wait.
            let _ = tx.try_send(Report {
                kind,
                identity: identity.clone(),
                detail,
            });
        }
    }

    /// The index as JSON (`--debug` only). kube2iam's keys (`rolesByIP`, `namespaceByIP`,
    /// `rolesByNamespace`) plus `pods` (IP → namespace, pod, UID, role ARN, denial) and the
    /// `resourceVersion` of the last pod event the snapshot reflects.
    pub fn store_json(&self) -> String {
        let snap = self.snapshot();
        let mut rows: Vec<(IpAddr, &Arc<Identity>)> =
            snap.iter().map(|(ip, id)| (*ip, id)).collect();
        rows.sort_by_key(|(ip, _)| *ip);
        let mut roles_by_ip = serde_json::Map::new();
        let mut ns_by_ip = serde_json::Map::new();
        let mut pods = Vec::with_capacity(rows.len());
        for (ip, id) in rows {
            let ip = ip.to_string();
            let arn = id.role.as_ref().map(|r| r.arn.clone());
            roles_by_ip.insert(ip.clone(), arn.clone().unwrap_or_default().into());
            ns_by_ip.insert(ip.clone(), id.namespace.clone().into());
            pods.push(serde_json::json!({
                "ip": ip,
                "namespace": id.namespace,
                "pod": id.pod,
                "uid": id.uid,
                "role": arn,
                "denied": id.denied.as_deref(),
            }));
        }
        serde_json::to_string_pretty(&serde_json::json!({
            "rolesByIP": roles_by_ip,
            "namespaceByIP": ns_by_ip,
            "rolesByNamespace": snap.allowed_roles(),
            "pods": pods,
            "resourceVersion": snap.resource_version(),
        }))
        .unwrap_or_default()
    }
}
